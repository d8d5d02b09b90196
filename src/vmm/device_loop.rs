//! The device event loop: one thread per VM (`smolvm-devices`) that serves virtio queue
//! notifications caught by ioeventfds and the devices' host-side sources (a TAP device, rate
//! limiter timers, the vsock multiplexer), off the vCPU threads.
//!
//! Each virtio-mmio device gets one eventfd per queue, registered with the hypervisor at the
//! device's QueueNotify register with the queue index as datamatch: a guest write there
//! signals the eventfd without a VM exit, and the loop calls
//! [`MmioTransport::notify_queue`]. Host descriptors a device lists in
//! [`VirtioDevice::host_events`](crate::devices::virtio::VirtioDevice::host_events) are
//! watched the same way and delivered through [`MmioTransport::host_event`]. A device that
//! stops early with work left (bounded work per event) is called again after the other ready
//! events: its queue eventfd is signalled again, or, for a host source, a per-device retry
//! eventfd is, so one busy device cannot monopolise the thread.
//!
//! Where the backend has no ioeventfd (and on non-Linux hosts) QueueNotify writes exit to the
//! vCPU thread and the transport serves them there; host sources still need the loop, which
//! runs whenever any device has one.

#[cfg(target_os = "linux")]
pub(super) use linux::{DeviceLoop, QueueEvents};

/// Nothing to run without eventfds: notifications take the MMIO exit path.
#[cfg(not(target_os = "linux"))]
pub(super) enum DeviceLoop {}

#[cfg(not(target_os = "linux"))]
impl DeviceLoop {
    /// Stops the loop and joins its thread (uninhabited here).
    pub(super) fn stop(self) {
        match self {}
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};

    use crate::devices::virtio::mmio::{MmioSlot, MmioTransport, QUEUE_NOTIFY_OFFSET};
    use crate::devices::virtio::{HostEvent, HostInterest};
    use crate::hypervisor::{EventFd, HypervisorError, IoEventAddress, Vm};
    use crate::{Error, Result};

    /// An eventfd registered as the ioeventfd of one queue; unregistered when dropped.
    struct QueueEvent {
        fd: EventFd,
        queue: u16,
        addr: IoEventAddress,
        vm: Arc<dyn Vm>,
    }

    impl Drop for QueueEvent {
        fn drop(&mut self) {
            if let Err(e) =
                self.vm
                    .unregister_ioeventfd(&self.fd, self.addr, Some(u32::from(self.queue)))
            {
                log::debug!("unregistering the ioeventfd of queue {}: {e}", self.queue);
            }
        }
    }

    /// One device's event sources, subscribed to the loop: its queue ioeventfds, the host
    /// descriptors it asked for ([`VirtioDevice::host_events`]), and a retry eventfd that
    /// brings the loop back to host sources whose device stopped early with work left.
    ///
    /// [`VirtioDevice::host_events`]: crate::devices::virtio::VirtioDevice::host_events
    pub(in crate::vmm) struct QueueEvents {
        transport: Arc<Mutex<MmioTransport>>,
        events: Vec<QueueEvent>,
        host: Vec<HostEvent>,
        retry: EventFd,
        /// Host sources to serve again when `retry` fires (no duplicates; bounded by
        /// `host.len()`).
        pending: Vec<(u32, HostInterest)>,
    }

    /// Event data of the retry eventfd; queue events use their index, host sources
    /// `HOST_BASE + index`.
    const RETRY: u32 = u32::MAX;
    const HOST_BASE: u32 = 1 << 16;

    impl QueueEvents {
        /// Registers an ioeventfd for each of `queues` queues of the device at `slot` (none
        /// when the backend has no ioeventfd: the MMIO exit path serves notifications then)
        /// and collects the device's host sources. `Ok(None)` when there is nothing to watch.
        ///
        /// # Errors
        /// Creating an eventfd or registering it failed for another reason.
        pub(in crate::vmm) fn register(
            vm: &Arc<dyn Vm>,
            slot: MmioSlot,
            queues: usize,
            transport: Arc<Mutex<MmioTransport>>,
        ) -> Result<Option<Self>> {
            let addr = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
            let mut events = Vec::with_capacity(queues);
            for queue in 0..queues {
                let queue = u16::try_from(queue)
                    .map_err(|_| Error::Config(format!("a virtio device with {queues} queues")))?;
                let fd = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| HypervisorError::backend("eventfd", e))?;
                match vm.register_ioeventfd(&fd, addr, Some(u32::from(queue))) {
                    Ok(()) => events.push(QueueEvent {
                        fd,
                        queue,
                        addr,
                        vm: vm.clone(),
                    }),
                    Err(HypervisorError::Unsupported(what)) => {
                        log::debug!("no ioeventfd ({what}): queue notifications exit to the VMM");
                        events.clear();
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let host = transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device()
                .host_events();
            if events.is_empty() && host.is_empty() {
                return Ok(None);
            }
            let retry = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| HypervisorError::backend("eventfd", e))?;
            Ok(Some(QueueEvents {
                transport,
                events,
                pending: Vec::with_capacity(host.len()),
                host,
                retry,
            }))
        }

        fn serve_host(&mut self, token: u32, ready: HostInterest) {
            let more = self
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .host_event(token, ready);
            if more {
                if !self.pending.iter().any(|&(t, _)| t == token) {
                    self.pending.push((token, ready));
                }
                if let Err(err) = self.retry.write(1) {
                    log::error!("device loop: re-signalling host source {token}: {err}");
                }
            }
        }
    }

    fn interest_to_events(i: HostInterest) -> EventSet {
        let mut set = EventSet::empty();
        if i.contains(HostInterest::READABLE) {
            set |= EventSet::IN;
        }
        if i.contains(HostInterest::WRITABLE) {
            set |= EventSet::OUT;
        }
        if i.contains(HostInterest::EDGE_TRIGGERED) {
            set |= EventSet::EDGE_TRIGGERED;
        }
        set
    }

    fn events_to_ready(set: EventSet) -> HostInterest {
        let mut ready = HostInterest::empty();
        if set.contains(EventSet::IN) {
            ready |= HostInterest::READABLE;
        }
        if set.contains(EventSet::OUT) {
            ready |= HostInterest::WRITABLE;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
            ready |= HostInterest::HANGUP;
        }
        ready
    }

    impl MutEventSubscriber for QueueEvents {
        fn init(&mut self, ops: &mut EventOps) {
            for (i, e) in self.events.iter().enumerate() {
                if let Err(err) = ops.add(Events::with_data(&e.fd, i as u32, EventSet::IN)) {
                    log::error!("device loop: watching queue {} failed: {err}", e.queue);
                }
            }
            for (i, h) in self.host.iter().enumerate() {
                let ev = Events::with_data_raw(
                    h.fd,
                    HOST_BASE + i as u32,
                    interest_to_events(h.interest),
                );
                if let Err(err) = ops.add(ev) {
                    log::error!(
                        "device loop: watching host source {} failed: {err}",
                        h.token
                    );
                }
            }
            if !self.host.is_empty() {
                if let Err(err) = ops.add(Events::with_data(&self.retry, RETRY, EventSet::IN)) {
                    log::error!("device loop: watching the retry event failed: {err}");
                }
            }
        }

        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            let data = events.data();
            if data == RETRY {
                let _ = self.retry.read();
                for (token, ready) in std::mem::take(&mut self.pending) {
                    self.serve_host(token, ready);
                }
                return;
            }
            if data >= HOST_BASE {
                if let Some(h) = self.host.get((data - HOST_BASE) as usize) {
                    let token = h.token;
                    self.serve_host(token, events_to_ready(events.event_set()));
                }
                return;
            }
            let Some(e) = self.events.get(data as usize) else {
                return;
            };
            // Consume the notification (EAGAIN: a spurious wake-up, nothing to consume).
            let _ = e.fd.read();
            let more = self
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .notify_queue(u32::from(e.queue));
            if more {
                // Work left: come back to this queue after the other ready events.
                if let Err(err) = e.fd.write(1) {
                    log::error!("device loop: re-signalling queue {}: {err}", e.queue);
                }
            }
        }
    }

    /// Wakes the loop to make it stop.
    struct StopEvent(Arc<EventFd>);

    impl MutEventSubscriber for StopEvent {
        fn init(&mut self, ops: &mut EventOps) {
            if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
                log::error!("device loop: watching the stop event failed: {e}");
            }
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.0.read();
        }
    }

    type Subscriber = Box<dyn MutEventSubscriber + Send>;

    /// The running `smolvm-devices` thread.
    pub(in crate::vmm) struct DeviceLoop {
        stop_fd: Arc<EventFd>,
        stopping: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    }

    impl DeviceLoop {
        /// Starts the loop over `devices`' queue events.
        ///
        /// # Errors
        /// The epoll instance, the stop eventfd or the thread could not be created.
        pub(in crate::vmm) fn start(devices: Vec<QueueEvents>) -> Result<Self> {
            use event_manager::SubscriberOps;

            let epoll_err = |e: event_manager::Error| {
                Error::Hypervisor(HypervisorError::backend(
                    "device event loop",
                    std::io::Error::other(e.to_string()),
                ))
            };
            let mut manager: EventManager<Subscriber> = EventManager::new().map_err(epoll_err)?;
            let stop_fd = Arc::new(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| HypervisorError::backend("eventfd", e))?,
            );
            let stopping = Arc::new(AtomicBool::new(false));
            manager.add_subscriber(Box::new(StopEvent(stop_fd.clone())));
            for d in devices {
                manager.add_subscriber(Box::new(d));
            }
            let flag = stopping.clone();
            let thread = std::thread::Builder::new()
                .name("smolvm-devices".into())
                .spawn(move || {
                    while !flag.load(Ordering::SeqCst) {
                        if let Err(e) = manager.run() {
                            log::error!("device event loop failed: {e}");
                            break;
                        }
                    }
                    // Dropping the manager here closes the epoll fd and drops the devices'
                    // ioeventfds (unregistered) and their transports' last loop references.
                })
                .map_err(Error::Thread)?;
            Ok(DeviceLoop {
                stop_fd,
                stopping,
                thread,
            })
        }

        /// Stops the loop and joins its thread (unless called from it).
        pub(in crate::vmm) fn stop(self) {
            self.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = self.stop_fd.write(1) {
                log::error!("waking the device event loop: {e}");
            }
            if self.thread.thread().id() == std::thread::current().id() {
                return;
            }
            if self.thread.join().is_err() {
                log::error!("the device event loop thread panicked");
            }
        }
    }
}

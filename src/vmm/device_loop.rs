//! The device event loop: one thread per VM (`smolvm-devices`) that serves virtio queue
//! notifications caught by ioeventfds, off the vCPU threads.
//!
//! Each virtio-mmio device gets one eventfd per queue, registered with the hypervisor at the
//! device's QueueNotify register with the queue index as datamatch: a guest write there
//! signals the eventfd without a VM exit, and the loop calls
//! [`MmioTransport::notify_queue`]. A device that stops early with work left (bounded work per
//! notification) gets its eventfd signalled again, so the loop comes back to it after serving
//! the other ready events instead of monopolising the thread.
//!
//! Where the backend has no ioeventfd (and on non-Linux hosts) no loop runs: QueueNotify
//! writes exit to the vCPU thread and the transport serves them there.

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

    /// One device's queue eventfds, subscribed to the loop.
    pub(in crate::vmm) struct QueueEvents {
        transport: Arc<Mutex<MmioTransport>>,
        events: Vec<QueueEvent>,
    }

    impl QueueEvents {
        /// Registers an ioeventfd for each of `queues` queues of the device at `slot`.
        /// `Ok(None)` when the backend has no ioeventfd: the MMIO exit path serves
        /// notifications then.
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
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Some(QueueEvents { transport, events }))
        }
    }

    impl MutEventSubscriber for QueueEvents {
        fn init(&mut self, ops: &mut EventOps) {
            for (i, e) in self.events.iter().enumerate() {
                if let Err(err) = ops.add(Events::with_data(&e.fd, i as u32, EventSet::IN)) {
                    log::error!("device loop: watching queue {} failed: {err}", e.queue);
                }
            }
        }

        fn process(&mut self, events: Events, _ops: &mut EventOps) {
            let Some(e) = self.events.get(events.data() as usize) else {
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

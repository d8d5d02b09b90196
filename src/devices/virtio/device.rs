//! The contract between a transport (virtio-mmio) and a device type (block, net, vsock).
//!
//! The transport owns the driver-facing handshake: feature windows, device status, queue
//! configuration, interrupt status. The device owns what is specific to it: its feature bits,
//! its configuration space and what it does with buffers. They meet at [`VirtioDevice`]:
//! the transport calls [`VirtioDevice::activate`] once the driver sets DRIVER_OK, forwards
//! queue notifications to [`VirtioDevice::queue_notify`], and calls
//! [`VirtioDevice::reset`] when the driver writes 0 to the status register. The device
//! reports back through the [`VirtioInterrupt`] it was activated with.
//!
//! Everything a device keeps must be plain data (queues are [`Queue`] values) so that a later
//! snapshot can save and restore it.

use std::sync::Arc;

use super::Queue;
use crate::memory::GuestMemory;

/// How a device signals the driver. Implemented by the transport, which sets its
/// interrupt-status bits and raises the device's interrupt line.
///
/// # Example
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use smolvm::devices::virtio::VirtioInterrupt;
///
/// /// Records what was signalled, for device unit tests.
/// #[derive(Default)]
/// struct Recorder(AtomicU32);
/// impl VirtioInterrupt for Recorder {
///     fn signal_used_queue(&self, _queue: u16) { self.0.fetch_or(1, Ordering::SeqCst); }
///     fn signal_config_change(&self) { self.0.fetch_or(2, Ordering::SeqCst); }
///     fn set_needs_reset(&self) { self.0.fetch_or(4, Ordering::SeqCst); }
/// }
/// let r = Recorder::default();
/// r.signal_used_queue(0);
/// assert_eq!(r.0.load(Ordering::SeqCst), 1);
/// ```
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of `queue` and the queue's notification
    /// suppression says the driver wants to know ([`Queue::needs_notification`]).
    fn signal_used_queue(&self, queue: u16);
    /// The device configuration space changed (e.g. a disk was resized).
    fn signal_config_change(&self);
    /// The device hit an unrecoverable driver error (e.g. a queue whose available index
    /// jumped, [`QueueError::AvailIndexJump`](super::QueueError::AvailIndexJump)): set
    /// DEVICE_NEEDS_RESET in the status register and notify a configuration change, as the
    /// virtio specification (2.1.2) requires.
    fn set_needs_reset(&self);
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory, where the queues and buffers live.
    pub mem: GuestMemory,
    /// One entry per queue of [`VirtioDevice::queue_max_sizes`], as the driver configured
    /// it; queues the driver did not enable have `ready == false`. Transport-validated
    /// ([`Queue::is_valid`]) when ready, with `indirect` / `event_idx` set from the
    /// negotiated features.
    pub queues: Vec<Queue>,
    /// The feature bits both sides accepted.
    pub features: u64,
    /// Where the device signals the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// Why a device refused to start. The transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// A queue the device cannot work without was not enabled by the driver.
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(u16),
    /// The device's backend failed to start (e.g. a host file could not be reopened).
    #[error("device backend failed to start: {0}")]
    Backend(String),
}

/// Copies `data.len()` bytes of a device configuration space `config` starting at `offset`
/// (driver-controlled), reading zeros past its end: what every device's
/// [`VirtioDevice::read_config`] does with a plain byte image of its configuration.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

bitflags::bitflags! {
    /// Readiness of a host file descriptor: what a device asks the event loop to watch for
    /// ([`HostEvent::interest`]) and what the loop reports ([`VirtioDevice::host_event`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::HostInterest;
    /// let i = HostInterest::READABLE | HostInterest::EDGE_TRIGGERED;
    /// assert!(i.contains(HostInterest::READABLE));
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HostInterest: u32 {
        /// Data can be read (or a listening socket has a connection to accept).
        const READABLE = 1;
        /// Data can be written.
        const WRITABLE = 1 << 1;
        /// The peer hung up or the descriptor is in error (reported, never requested).
        const HANGUP = 1 << 2;
        /// Report transitions only (epoll `EPOLLET`): the device must drain the descriptor
        /// until it would block, or remember that it did not. The way to watch a source the
        /// device cannot always serve (a TAP while the guest posted no receive buffers)
        /// without the loop spinning on it.
        const EDGE_TRIGGERED = 1 << 3;
    }
}

/// A host file descriptor (a TAP device, a timer, a socket multiplexer's epoll) that a device
/// wants the device event loop to watch, so host-side I/O drives it as guest notifications do.
///
/// The set is fixed for the device's lifetime: the loop asks [`VirtioDevice::host_events`]
/// once when the VM starts. A device whose sources come and go (vsock connections) watches
/// them through one epoll descriptor of its own and lists that.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::{HostEvent, HostInterest};
/// let e = HostEvent { fd: 0, token: 7, interest: HostInterest::READABLE };
/// assert_eq!(e.token, 7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostEvent {
    /// The descriptor; it must stay open as long as the device exists.
    pub fd: std::os::raw::c_int,
    /// Passed back to [`VirtioDevice::host_event`] to say which source is ready.
    pub token: u32,
    /// What to watch for.
    pub interest: HostInterest,
}

/// A virtio device type, driven by a transport.
///
/// Calls arrive from the transport's thread of execution (a vCPU thread on the MMIO exit
/// path, or the device event loop for ioeventfd notifications), never concurrently: the
/// transport holds the device behind a lock.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::{
///     ActivateContext, ActivateError, VirtioDevice, DEVICE_ID_RNG, VIRTIO_F_VERSION_1,
/// };
///
/// /// A device with one queue that completes every buffer without touching it.
/// #[derive(Default)]
/// struct Sink { active: Option<ActivateContext> }
/// impl VirtioDevice for Sink {
///     fn device_type(&self) -> u32 { DEVICE_ID_RNG }
///     fn queue_max_sizes(&self) -> &[u16] { &[256] }
///     fn device_features(&self) -> u64 { 1 << VIRTIO_F_VERSION_1 }
///     fn read_config(&self, _offset: u64, data: &mut [u8]) { data.fill(0) }
///     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
///     fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
///         self.active = Some(ctx);
///         Ok(())
///     }
///     fn queue_notify(&mut self, queue: u16) -> bool {
///         let Some(ctx) = self.active.as_mut() else { return false };
///         let Some(q) = ctx.queues.get_mut(usize::from(queue)) else { return false };
///         // Bounded work per call: at most 64 chains, then let the caller serve others.
///         let mut served = 0;
///         while let Ok(Some(chain)) = q.pop(&ctx.mem) {
///             let _ = q.add_used(&ctx.mem, chain.head_index(), 0);
///             served += 1;
///             if served == 64 {
///                 break;
///             }
///         }
///         if q.needs_notification(&ctx.mem) {
///             ctx.interrupt.signal_used_queue(queue);
///         }
///         served == 64 // maybe more pending: call again
///     }
///     fn reset(&mut self) { self.active = None }
/// }
/// assert_eq!(Sink::default().queue_max_sizes().len(), 1);
/// ```
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. [`DEVICE_ID_BLOCK`](super::DEVICE_ID_BLOCK)).
    fn device_type(&self) -> u32;

    /// The largest size of each queue (a power of two); the slice's length is the number of
    /// queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers, including [`VIRTIO_F_VERSION_1`](super::VIRTIO_F_VERSION_1)
    /// and the ring features it supports. The transport accepts a driver's selection only if it
    /// is a subset that includes VERSION_1.
    fn device_features(&self) -> u64;

    /// Reads device configuration space at `offset`. Bytes beyond the device's configuration
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space. Most devices ignore writes; out-of-range writes are
    /// dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver finished the handshake (DRIVER_OK): start serving `ctx.queues`.
    ///
    /// # Errors
    /// [`ActivateError`] if the device cannot work with what the driver configured.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver notified `queue` (a QueueNotify write or its ioeventfd): process what is
    /// available. Called only after a successful [`activate`](Self::activate); indices of
    /// queues that do not exist must be ignored.
    ///
    /// A device should bound the work of one call (a driver that keeps refilling the ring must
    /// not hold the calling thread forever). Returns `true` when it stopped early with work
    /// left: the caller must call again — after serving its other events, for fairness —
    /// because the driver will not notify again for buffers it already made available.
    /// `false`: nothing left to do until the next notification.
    fn queue_notify(&mut self, queue: u16) -> bool;

    /// The driver reset the device (status 0): stop all I/O, drop the queues and return to
    /// the state before activation. In-flight requests are abandoned (the driver will not look
    /// at their used entries).
    fn reset(&mut self);

    /// Host descriptors that drive the device besides queue notifications (see
    /// [`HostEvent`]). Asked once, when the VM starts; none by default.
    fn host_events(&self) -> Vec<HostEvent> {
        Vec::new()
    }

    /// The host source registered with `token` is ready (`ready` holds READABLE, WRITABLE
    /// and/or HANGUP). Called whether or not the device is activated: a device that cannot
    /// serve the source now must consume or disarm it (or watch it edge-triggered and
    /// remember), or a level-triggered source would make the loop spin.
    ///
    /// Returns `true`, like [`queue_notify`](Self::queue_notify), when it stopped early with
    /// work left: the loop calls again after serving its other events.
    fn host_event(&mut self, token: u32, ready: HostInterest) -> bool {
        let _ = (token, ready);
        false
    }
}

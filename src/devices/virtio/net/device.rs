//! The virtio-net device proper: [`Net`], its configuration ([`NetConfig`]) and counters
//! ([`NetStats`]). See the [module documentation](super) for the design.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::backend::{NetBackend, TxFrame};
use super::*;
use crate::devices::rate_limiter::{RateLimit, RateLimiter};
use crate::devices::virtio::{
    ActivateContext, ActivateError, DescriptorChain, HostEvent, HostInterest, Queue, QueueError,
    VirtioDevice, VirtioInterrupt, DEVICE_ID_NET, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Default (and largest offered) size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame (Ethernet header included, virtio header excluded) the device moves: a 64 KiB
/// offload segment plus Ethernet and VLAN headers, the bound the virtio specification uses.
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest transmitted frame accepted: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Bytes of the device's one receive buffer: a header and the largest frame.
pub const RX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames moved per direction in one call at most (bounded work per event).
pub const MAX_FRAMES_PER_CALL: usize = 256;
/// [`HostEvent::token`] of the backend's descriptor.
pub const TOKEN_BACKEND: u32 = 0;
/// [`HostEvent::token`] of the receive rate limiter's timer.
pub const TOKEN_RX_LIMITER: u32 = 1;
/// [`HostEvent::token`] of the transmit rate limiter's timer.
pub const TOKEN_TX_LIMITER: u32 = 2;

/// Frame pieces passed to the backend without a copy; longer chains are copied into one buffer.
const MAX_TX_SEGMENTS: usize = 64;
/// Bytes of configuration space: mac, status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;

/// How to build a [`Net`]. `Default` is: random MAC, no rate limits, 256-entry queues.
///
/// # Example
/// ```
/// use smolvm::devices::rate_limiter::{BucketConfig, RateLimit};
/// use smolvm::devices::virtio::net::NetConfig;
/// let cfg = NetConfig {
///     // 1 Gbit/s with 1 MiB of burst, 100k packets/s, guest to host.
///     tx_rate_limit: Some(RateLimit {
///         bytes: Some(BucketConfig { rate: 125_000_000, burst: 1 << 20 }),
///         ops: Some(BucketConfig { rate: 100_000, burst: 1000 }),
///     }),
///     ..Default::default()
/// };
/// assert!(cfg.mac.is_none() && cfg.rx_rate_limit.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address; `None`: a random locally administered unicast address.
    pub mac: Option<[u8; 6]>,
    /// Limit on what the guest receives (host → guest); `None`: unlimited.
    pub rx_rate_limit: Option<RateLimit>,
    /// Limit on what the guest sends (guest → host); `None`: unlimited.
    pub tx_rate_limit: Option<RateLimit>,
    /// Maximum size of each queue: a power of two in 2..=32768.
    pub queue_size: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            mac: None,
            rx_rate_limit: None,
            tx_rate_limit: None,
            queue_size: QUEUE_SIZE,
        }
    }
}

/// Counters of what a [`Net`] did, as plain data ([`NetStatsHandle::snapshot`]).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::NetStats;
/// let s = NetStats::default();
/// assert_eq!(s.tx_frames + s.rx_frames + s.tx_dropped(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (frames, without virtio headers).
    pub rx_bytes: u64,
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Bytes the guest sent that reached the backend (frames, without virtio headers).
    pub tx_bytes: u64,
    /// Transmit chains dropped for a bad header: too short, unknown flags or GSO type, an
    /// offload that was not negotiated, a checksum position outside the frame.
    pub tx_malformed: u64,
    /// Transmit frames dropped for being shorter than [`MIN_FRAME_LEN`] or longer than
    /// [`MAX_FRAME_LEN`].
    pub tx_bad_length: u64,
    /// Transmit frames the backend refused with an error.
    pub tx_backend_errors: u64,
    /// Times transmission stopped on the transmit rate limit.
    pub tx_throttled: u64,
    /// Received frames dropped because they did not fit the guest's buffer (without
    /// `MRG_RXBUF`) or all of the queue.
    pub rx_too_big: u64,
    /// Times a received frame had to wait for the guest to post buffers (back-pressure).
    pub rx_no_buffer: u64,
    /// Backend read errors and frames too short to carry a header.
    pub rx_backend_errors: u64,
    /// Times reception stopped on the receive rate limit.
    pub rx_throttled: u64,
    /// Chains (either queue) the queue layer rejected, and receive chains with no room for a
    /// header; returned with used length 0.
    pub bad_chains: u64,
    /// Times a queue broke (ring outside memory, available index jump) and the device asked
    /// for a reset.
    pub queue_failures: u64,
}

impl NetStats {
    /// Transmit frames dropped for any reason.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_malformed + self.tx_bad_length + self.tx_backend_errors
    }
}

macro_rules! counters {
    ($($f:ident),* $(,)?) => {
        /// The live counters behind [`NetStatsHandle`].
        #[derive(Debug, Default)]
        struct Counters { $($f: AtomicU64,)* }
        impl Counters {
            fn snapshot(&self) -> NetStats {
                NetStats { $($f: self.$f.load(Ordering::Relaxed),)* }
            }
        }
    };
}
counters!(
    rx_frames,
    rx_bytes,
    tx_frames,
    tx_bytes,
    tx_malformed,
    tx_bad_length,
    tx_backend_errors,
    tx_throttled,
    rx_too_big,
    rx_no_buffer,
    rx_backend_errors,
    rx_throttled,
    bad_chains,
    queue_failures,
);

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A cheap, cloneable reader of a device's counters that does not touch the device (no lock
/// on the transport): what a VM handle keeps.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
/// let net = Net::new(MemBackend::default(), NetConfig::default())?;
/// let stats = net.stats_handle();
/// assert_eq!(stats.snapshot().rx_frames, 0);
/// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
/// ```
#[derive(Debug, Clone)]
pub struct NetStatsHandle(Arc<Counters>);

impl NetStatsHandle {
    /// The counters now (each read atomically; the set is not one atomic snapshot).
    pub fn snapshot(&self) -> NetStats {
        self.0.snapshot()
    }
}

/// What an activated device holds.
struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    features: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx_broken: bool,
    tx_broken: bool,
}

/// A virtio-net device over a [`NetBackend`] (see the [module documentation](super)).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig, VIRTIO_NET_F_MRG_RXBUF};
/// use smolvm::devices::virtio::VirtioDevice;
/// let net = Net::new(MemBackend::default(), NetConfig::default())?;
/// assert_ne!(net.device_features() & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
/// assert_eq!(net.queue_max_sizes(), &[256, 256]);
/// let mac = net.mac();
/// assert_eq!(mac[0] & 0b11, 0b10); // locally administered, unicast
/// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
/// ```
pub struct Net<B: NetBackend = Box<dyn NetBackend>> {
    backend: B,
    features: u64,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 2],
    active: Option<Active>,
    /// The receive buffer; `rx_len > 0` while it holds a frame waiting for guest buffers.
    rx_buf: Box<[u8]>,
    rx_len: usize,
    /// The frame in `rx_buf` was already counted in `rx_no_buffer`.
    rx_waiting: bool,
    /// Used elements of the frame being received (mergeable buffers), reused.
    rx_used: Vec<(u16, u32)>,
    /// Transmit frames whose chain is too fragmented (or spans memory regions) are copied here.
    tx_buf: Box<[u8]>,
    /// The backend may have frames to read (edge-triggered: set on a readiness report, cleared
    /// on `WouldBlock`).
    backend_readable: bool,
    /// A write hit `WouldBlock`: transmission waits for the backend to become writable.
    tx_wait_writable: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    stats: Arc<Counters>,
}

impl<B: NetBackend> fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_args!("{:02x?}", self.mac))
            .field("features", &format_args!("{:#x}", self.features))
            .field("activated", &self.active.is_some())
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// A random locally administered unicast MAC (std's randomly keyed hasher as the source: no
/// extra dependency, and uniqueness is all that matters).
fn random_mac() -> [u8; 6] {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish().to_le_bytes();
    [(r[0] & 0xfc) | 0x02, r[1], r[2], r[3], r[4], r[5]]
}

impl<B: NetBackend> Net<B> {
    /// A device over `backend`, not yet activated.
    ///
    /// # Errors
    /// [`NetError::InvalidQueueSize`]; [`NetError::Timer`] when a rate limiter's timerfd
    /// cannot be created.
    ///
    /// # Example
    /// See [`Net`].
    pub fn new(backend: B, config: NetConfig) -> Result<Self, NetError> {
        let qs = config.queue_size;
        if !qs.is_power_of_two()
            || !(2..=crate::devices::virtio::queue::MAX_QUEUE_SIZE).contains(&qs)
        {
            return Err(NetError::InvalidQueueSize(qs));
        }
        let mac = config.mac.unwrap_or_else(random_mac);
        let features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_RING_EVENT_IDX)
            | (1 << VIRTIO_F_RING_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_UFO)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO);
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&mac);
        cfg[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        let limiter = |l: Option<RateLimit>| RateLimiter::new(l.unwrap_or_default());
        Ok(Net {
            backend,
            features,
            mac,
            config: cfg,
            queue_max_sizes: [qs, qs],
            active: None,
            rx_buf: vec![0; RX_BUFFER_LEN].into_boxed_slice(),
            rx_len: 0,
            rx_waiting: false,
            rx_used: Vec::with_capacity(usize::from(qs)),
            tx_buf: vec![0; MAX_FRAME_LEN].into_boxed_slice(),
            backend_readable: true,
            tx_wait_writable: false,
            rx_limiter: limiter(config.rx_rate_limit).map_err(NetError::Timer)?,
            tx_limiter: limiter(config.tx_rate_limit).map_err(NetError::Timer)?,
            stats: Arc::default(),
        })
    }

    /// Replaces the rate limiters (for tests that inject a clock, or to change limits before
    /// the VM starts: the set of [host events](VirtioDevice::host_events) is fixed once asked).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::rate_limiter::{RateLimit, RateLimiter};
    /// use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let mut net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// net.set_rate_limiters(RateLimiter::new(RateLimit::default())?, RateLimiter::new(RateLimit::default())?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_rate_limiters(&mut self, rx: RateLimiter, tx: RateLimiter) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// The guest's MAC address.
    ///
    /// # Example
    /// See [`Net`].
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// A handle on the device's counters, readable from any thread.
    ///
    /// # Example
    /// See [`NetStatsHandle`].
    pub fn stats_handle(&self) -> NetStatsHandle {
        NetStatsHandle(self.stats.clone())
    }

    /// The counters now.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// assert_eq!(net.stats().tx_frames, 0);
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn stats(&self) -> NetStats {
        self.stats.snapshot()
    }

    /// The backend.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// assert!(net.backend().tx.is_empty());
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (e.g. to feed a [`MemBackend`](super::MemBackend)).
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let mut net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// net.backend_mut().rx.push_back(vec![0; 60]);
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Moves frames from the backend into receive buffers until the backend is empty, the
    /// guest has no buffer left (the frame waits: back-pressure), the receive limit throttles,
    /// or [`MAX_FRAMES_PER_CALL`] frames were handled. Returns `true` in the last case: call
    /// again after serving other events.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let mut net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// assert!(!net.process_rx()); // not activated: nothing to do
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn process_rx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if a.rx_broken || !a.rx.ready || self.rx_limiter.is_throttled() {
            return false;
        }
        let stats = &*self.stats;
        let mergeable = a.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut handled = 0usize;
        let mut completed = 0usize;
        let mut more = false;
        loop {
            if handled >= MAX_FRAMES_PER_CALL {
                more = true;
                break;
            }
            if self.rx_len == 0 {
                if !self.backend_readable {
                    break;
                }
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        log::debug!(
                            "virtio-net: backend frame of {n} bytes, shorter than a header"
                        );
                        bump(&stats.rx_backend_errors, 1);
                        handled += 1;
                        continue;
                    }
                    Ok(n) => {
                        self.rx_len = n;
                        self.rx_waiting = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.backend_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        handled += 1;
                        continue;
                    }
                    Err(e) => {
                        // Stop until the next readiness report rather than spin on an error.
                        log::warn!("virtio-net: backend read failed: {e}");
                        bump(&stats.rx_backend_errors, 1);
                        self.backend_readable = false;
                        break;
                    }
                }
            }
            handled += 1;
            let frame_len = (self.rx_len - VNET_HDR_LEN) as u64;
            if !self.rx_limiter.consume(1, frame_len) {
                bump(&stats.rx_throttled, 1);
                break;
            }
            let frame = &mut self.rx_buf[..self.rx_len];
            match deliver(a, frame, mergeable, &mut self.rx_used, stats) {
                Delivery::Done(n) => {
                    bump(&stats.rx_frames, 1);
                    bump(&stats.rx_bytes, frame_len);
                    completed += n;
                    self.rx_len = 0;
                }
                Delivery::TooBig => {
                    bump(&stats.rx_too_big, 1);
                    self.rx_limiter.refund(1, frame_len);
                    self.rx_len = 0;
                }
                Delivery::NoBuffers => {
                    self.rx_limiter.refund(1, frame_len);
                    if !self.rx_waiting {
                        self.rx_waiting = true;
                        bump(&stats.rx_no_buffer, 1);
                    }
                    // Ask for a kick when buffers come; if some came meanwhile, go on.
                    if !a.rx.enable_notification(&a.mem) {
                        break;
                    }
                }
                Delivery::Fatal(e) => {
                    log::warn!("virtio-net: receive queue broken, needs reset: {e}");
                    bump(&stats.queue_failures, 1);
                    a.rx_broken = true;
                    a.interrupt.set_needs_reset();
                    break;
                }
            }
        }
        if completed > 0 && a.rx.needs_notification(&a.mem) {
            a.interrupt.signal_used_queue(RX_QUEUE);
        }
        more
    }

    /// Sends the frames the guest made available on the transmit queue until it is empty,
    /// the transmit limit throttles, the backend is full, or [`MAX_FRAMES_PER_CALL`] chains
    /// were handled. Returns `true` in the last case: call again after serving other events.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
    /// let mut net = Net::new(MemBackend::default(), NetConfig::default())?;
    /// assert!(!net.process_tx()); // not activated: nothing to do
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if a.tx_broken || !a.tx.ready || self.tx_limiter.is_throttled() || self.tx_wait_writable {
            return false;
        }
        let stats = &*self.stats;
        let mut tx = TxCtx {
            backend: &mut self.backend,
            limiter: &mut self.tx_limiter,
            tx_buf: &mut self.tx_buf,
            stats,
            features: a.features,
            mem: &a.mem,
        };
        let queue = &mut a.tx;
        let mem = &a.mem;
        let mut served = 0usize;
        let mut completed = 0usize;
        let mut more = false;
        let mut fatal = None;
        'outer: loop {
            queue.disable_notification(mem);
            loop {
                if served >= MAX_FRAMES_PER_CALL {
                    more = true;
                    break 'outer;
                }
                let head = match queue.pop(mem) {
                    Ok(None) => break,
                    Ok(Some(chain)) => match tx.send(&chain) {
                        TxOutcome::Done => chain.head_index(),
                        TxOutcome::Retry { writable } => {
                            // Leave the chain in the ring; the limiter's timer or the
                            // backend's writability brings us back.
                            queue.next_avail = queue.next_avail.wrapping_sub(1);
                            if writable {
                                self.tx_wait_writable = true;
                            }
                            break 'outer;
                        }
                    },
                    Err(e) => match e.chain_head() {
                        Some(head) => {
                            log::debug!("virtio-net: bad transmit chain: {e}");
                            bump(&stats.bad_chains, 1);
                            head
                        }
                        None => match e {
                            QueueError::HeadOutOfRange { .. } => {
                                log::debug!("virtio-net: skipping available entry: {e}");
                                bump(&stats.bad_chains, 1);
                                served += 1;
                                continue;
                            }
                            QueueError::NotReady { .. } => break 'outer,
                            e => {
                                fatal = Some(e);
                                break 'outer;
                            }
                        },
                    },
                };
                served += 1;
                if let Err(e) = queue.add_used(mem, head, 0) {
                    fatal = Some(e);
                    break 'outer;
                }
                completed += 1;
            }
            if !queue.enable_notification(mem) {
                break;
            }
        }
        if more || self.tx_wait_writable || self.tx_limiter.is_throttled() {
            // Let the driver's next kick through even if we are not called back first.
            queue.enable_notification(mem);
        }
        if completed > 0 && queue.needs_notification(mem) {
            a.interrupt.signal_used_queue(TX_QUEUE);
        }
        if let Some(e) = fatal {
            log::warn!("virtio-net: transmit queue broken, needs reset: {e}");
            bump(&stats.queue_failures, 1);
            a.tx_broken = true;
            a.interrupt.set_needs_reset();
        }
        more
    }
}

/// Outcome of delivering one received frame.
enum Delivery {
    /// Delivered in this many chains.
    Done(usize),
    /// No (more) buffers: nothing consumed, the frame waits.
    NoBuffers,
    /// The frame cannot fit the buffers the driver posts: drop it.
    TooBig,
    /// The queue is unusable.
    Fatal(QueueError),
}

/// Copies `frame` (header included) into receive chains, one chain without `MRG_RXBUF`, as
/// many as needed with it, and returns them. Chains are taken only when the whole frame fits:
/// otherwise the ring position is rewound and the chains stay available.
fn deliver(
    a: &mut Active,
    frame: &mut [u8],
    mergeable: bool,
    used: &mut Vec<(u16, u32)>,
    stats: &Counters,
) -> Delivery {
    let total = frame.len();
    let mem = &a.mem;
    let q = &mut a.rx;
    used.clear();
    // Ring entries taken for this frame (including skipped bad entries), to rewind.
    let mut taken: u16 = 0;
    let mut first: Option<DescriptorChain> = None;
    let mut written = 0usize;
    if !mergeable {
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    }
    while written < total {
        if usize::from(taken) >= usize::from(q.size) {
            // Even the whole ring cannot hold it (tiny buffers): drop the frame.
            q.next_avail = q.next_avail.wrapping_sub(taken);
            return Delivery::TooBig;
        }
        let chain = match q.pop(mem) {
            Ok(None) => {
                q.next_avail = q.next_avail.wrapping_sub(taken);
                return Delivery::NoBuffers;
            }
            Ok(Some(c)) => c,
            Err(e) => {
                if let Some(head) = e.chain_head() {
                    log::debug!("virtio-net: bad receive chain: {e}");
                    bump(&stats.bad_chains, 1);
                    if used.is_empty() {
                        // Nothing of this frame yet: return it now, out of the way.
                        if let Err(e) = q.add_used(mem, head, 0) {
                            return Delivery::Fatal(e);
                        }
                    } else {
                        taken += 1;
                        used.push((head, 0));
                    }
                    continue;
                }
                match e {
                    QueueError::HeadOutOfRange { .. } => {
                        bump(&stats.bad_chains, 1);
                        if !used.is_empty() {
                            taken += 1;
                        }
                        continue;
                    }
                    e => return Delivery::Fatal(e),
                }
            }
        };
        let room = chain.writable_len();
        if used.is_empty() && room < VNET_HDR_LEN as u64 {
            // Cannot even carry the header: useless to the driver, give it back.
            bump(&stats.bad_chains, 1);
            if let Err(e) = q.add_used(mem, chain.head_index(), 0) {
                return Delivery::Fatal(e);
            }
            continue;
        }
        taken += 1;
        if !mergeable && room < total as u64 {
            q.next_avail = q.next_avail.wrapping_sub(taken);
            return Delivery::TooBig;
        }
        let n = (total - written).min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match chain.write_at(mem, 0, &frame[written..written + n]) {
            Ok(k) => k,
            Err(e) => {
                // Validated memory that fails: count it and skip the chain's bytes.
                log::debug!("virtio-net: writing a receive chain failed: {e}");
                bump(&stats.bad_chains, 1);
                0
            }
        };
        used.push((chain.head_index(), n as u32));
        written += n;
        if first.is_none() {
            first = Some(chain);
        }
        if !mergeable {
            break;
        }
    }
    if mergeable {
        if let Some(c) = &first {
            let count = u16::try_from(used.len()).unwrap_or(u16::MAX);
            if let Err(e) = c.write_at(mem, 10, &count.to_le_bytes()) {
                log::debug!("virtio-net: writing num_buffers failed: {e}");
            }
        }
    }
    for &(head, len) in used.iter() {
        if let Err(e) = q.add_used(mem, head, len) {
            return Delivery::Fatal(e);
        }
    }
    Delivery::Done(used.len())
}

/// Outcome of one transmit chain.
enum TxOutcome {
    /// Sent or dropped: return the chain.
    Done,
    /// Not now (throttled, or the backend is full when `writable`): keep the chain.
    Retry { writable: bool },
}

/// What sending one frame needs, borrowed from the device.
struct TxCtx<'a, B: NetBackend> {
    backend: &'a mut B,
    limiter: &'a mut RateLimiter,
    tx_buf: &'a mut [u8],
    stats: &'a Counters,
    features: u64,
    mem: &'a GuestMemory,
}

/// Why a transmit header is refused.
fn check_tx_header(
    hdr: &[u8; VNET_HDR_LEN],
    frame_len: usize,
    features: u64,
) -> Result<(), &'static str> {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let flags = hdr[0];
    let gso_type = hdr[1];
    let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
    let csum_start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err("unknown or receive-only header flags");
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !has(VIRTIO_NET_F_CSUM) {
            return Err("NEEDS_CSUM without VIRTIO_NET_F_CSUM");
        }
        if csum_start + csum_offset + 2 > frame_len {
            return Err("checksum position outside the frame");
        }
    }
    let needed = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => None,
        VIRTIO_NET_HDR_GSO_TCPV4 => Some(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => Some(VIRTIO_NET_F_HOST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => Some(VIRTIO_NET_F_HOST_UFO),
        _ => return Err("unknown GSO type (or ECN, which is not offered)"),
    };
    if let Some(bit) = needed {
        if !has(bit) {
            return Err("GSO type whose offload was not negotiated");
        }
        if gso_size == 0 {
            return Err("GSO frame with gso_size 0");
        }
    }
    Ok(())
}

impl<B: NetBackend> TxCtx<'_, B> {
    fn send(&mut self, chain: &DescriptorChain) -> TxOutcome {
        let rlen = chain.readable_len();
        let mut hdr = [0u8; VNET_HDR_LEN];
        if rlen < VNET_HDR_LEN as u64 || chain.read_exact_at(self.mem, 0, &mut hdr).is_err() {
            bump(&self.stats.tx_malformed, 1);
            return TxOutcome::Done;
        }
        let frame_len = rlen - VNET_HDR_LEN as u64;
        if frame_len < MIN_FRAME_LEN as u64 || frame_len > MAX_FRAME_LEN as u64 {
            log::debug!("virtio-net: dropping a {frame_len}-byte transmit frame");
            bump(&self.stats.tx_bad_length, 1);
            return TxOutcome::Done;
        }
        let frame_len = frame_len as usize;
        if let Err(why) = check_tx_header(&hdr, frame_len, self.features) {
            log::debug!("virtio-net: dropping a transmit frame: {why}");
            bump(&self.stats.tx_malformed, 1);
            return TxOutcome::Done;
        }
        if !self.limiter.consume(1, frame_len as u64) {
            bump(&self.stats.tx_throttled, 1);
            return TxOutcome::Retry { writable: false };
        }
        let mut empty = [0u8; 0];
        let placeholder = VolatileSlice::from(&mut empty[..]);
        let mut segs = [placeholder; MAX_TX_SEGMENTS];
        let count = gather(self.mem, chain, &mut segs);
        let result = match count {
            Some(n) => self.backend.write_frame(&TxFrame::new(&hdr, &segs[..n])),
            None => {
                // Too fragmented for the scatter list: copy into the device's buffer.
                let buf = &mut self.tx_buf[..frame_len];
                match chain.read_exact_at(self.mem, VNET_HDR_LEN as u64, buf) {
                    Ok(()) => {
                        let one = [VolatileSlice::from(&mut *buf)];
                        self.backend.write_frame(&TxFrame::new(&hdr, &one))
                    }
                    Err(e) => {
                        log::debug!("virtio-net: reading a transmit chain failed: {e}");
                        bump(&self.stats.tx_malformed, 1);
                        self.limiter.refund(1, frame_len as u64);
                        return TxOutcome::Done;
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                bump(&self.stats.tx_frames, 1);
                bump(&self.stats.tx_bytes, frame_len as u64);
                TxOutcome::Done
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.limiter.refund(1, frame_len as u64);
                TxOutcome::Retry { writable: true }
            }
            Err(e) => {
                log::debug!("virtio-net: backend refused a transmit frame: {e}");
                bump(&self.stats.tx_backend_errors, 1);
                TxOutcome::Done
            }
        }
    }
}

/// Host slices of the chain's readable bytes after the header, into `segs`. `None` when they
/// do not fit `segs` or a piece is not contiguous host memory (spans regions).
fn gather<'m>(
    mem: &'m GuestMemory,
    chain: &DescriptorChain,
    segs: &mut [VolatileSlice<'m>],
) -> Option<usize> {
    let mut skip = VNET_HDR_LEN as u64;
    let mut n = 0;
    for d in chain.readable() {
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let addr = d.addr.0.checked_add(skip)?;
        let piece = usize::try_from(len - skip).ok()?;
        skip = 0;
        let slot = segs.get_mut(n)?;
        *slot = mem.get_slice(GuestAddress(addr), piece).ok()?;
        n += 1;
    }
    Some(n)
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only for legacy drivers or with CTRL_MAC_ADDR: nothing here.
        log::debug!(
            "virtio-net: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let rx = queues
            .next()
            .filter(|q| q.ready)
            .ok_or(ActivateError::QueueNotReady(RX_QUEUE))?;
        let tx = queues
            .next()
            .filter(|q| q.ready)
            .ok_or(ActivateError::QueueNotReady(TX_QUEUE))?;
        self.backend.set_offloads(ctx.features).map_err(|e| {
            ActivateError::Backend(format!("cannot set the backend's offloads: {e}"))
        })?;
        self.active = Some(Active {
            mem: ctx.mem,
            rx,
            tx,
            features: ctx.features,
            interrupt: ctx.interrupt,
            rx_broken: false,
            tx_broken: false,
        });
        // Frames may have arrived while the device was down (edge already consumed).
        self.backend_readable = true;
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) -> bool {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
        self.rx_waiting = false;
        self.tx_wait_writable = false;
    }

    fn host_events(&self) -> Vec<HostEvent> {
        let mut v = Vec::new();
        if let Some(fd) = self.backend.fd() {
            v.push(HostEvent {
                fd,
                token: TOKEN_BACKEND,
                interest: HostInterest::READABLE
                    | HostInterest::WRITABLE
                    | HostInterest::EDGE_TRIGGERED,
            });
        }
        for (l, token) in [
            (&self.rx_limiter, TOKEN_RX_LIMITER),
            (&self.tx_limiter, TOKEN_TX_LIMITER),
        ] {
            if let Some(fd) = l.timer_fd() {
                v.push(HostEvent {
                    fd,
                    token,
                    interest: HostInterest::READABLE,
                });
            }
        }
        v
    }

    fn host_event(&mut self, token: u32, ready: HostInterest) -> bool {
        match token {
            TOKEN_BACKEND => {
                let mut more = false;
                if ready.intersects(HostInterest::READABLE | HostInterest::HANGUP) {
                    self.backend_readable = true;
                    more |= self.process_rx();
                }
                if ready.contains(HostInterest::WRITABLE) && self.tx_wait_writable {
                    self.tx_wait_writable = false;
                    more |= self.process_tx();
                }
                more
            }
            TOKEN_RX_LIMITER => {
                self.rx_limiter.timer_expired();
                self.process_rx()
            }
            TOKEN_TX_LIMITER => {
                self.tx_limiter.timer_expired();
                self.process_tx()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
pub(super) fn check_tx_header_for_tests(
    hdr: &[u8; VNET_HDR_LEN],
    frame_len: usize,
    features: u64,
) -> Result<(), &'static str> {
    check_tx_header(hdr, frame_len, features)
}

//! The virtio-vsock device: queues in, packets to and from the muxer.
//!
//! See the [module documentation](super) for the protocol. Queue handling follows virtio-blk:
//! chain errors from [`Queue::pop`] that name a head are returned with used length 0;
//! [`QueueError::AvailIndexJump`] and [`QueueError::RingAccess`] make the device call
//! [`VirtioInterrupt::set_needs_reset`] and ignore its queues until reset. Each
//! [`VirtioDevice::queue_notify`] / [`VirtioDevice::host_event`] call moves at most
//! [`MAX_PACKETS_PER_CALL`] packets each way and returns `true` when it stopped early.
//!
//! Payload moves through one reusable buffer of [`MAX_PKT_PAYLOAD`] bytes allocated with the
//! device: no allocation per packet.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
//! use smolvm::devices::virtio::VirtioDevice;
//! let vsock = Vsock::new(VsockConfig::new(42))?;
//! let mut cid = [0u8; 8];
//! vsock.read_config(0, &mut cid);
//! assert_eq!(u64::from_le_bytes(cid), 42);
//! assert_eq!(vsock.queue_max_sizes().len(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::host::{HostShared, VsockHost};
use super::muxer::{sockaddr_un, Muxer};
use super::packet::{Op, PacketError, PacketHeader, HDR_LEN};
use crate::devices::virtio::{
    ActivateContext, ActivateError, DescriptorChain, HostEvent, HostInterest, Queue, QueueError,
    VirtioDevice, VirtioInterrupt, DEVICE_ID_VSOCK, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload accepted in one guest packet and put in one rx packet (what Linux uses,
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Packets moved per direction per call at most.
pub const MAX_PACKETS_PER_CALL: usize = 256;
/// Longest `uds_path` in bytes: `sun_path` holds 107 bytes and guest-initiated connections
/// use `<uds_path>_<port>`, up to 11 bytes more.
pub const MAX_UDS_PATH_LEN: usize = 107 - 11;

const RX: usize = 0;
const TX: usize = 1;
/// Token of the muxer's epoll in [`VirtioDevice::host_events`].
const MUXER_TOKEN: u32 = 0;

/// How to build a [`Vsock`].
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::VsockConfig;
/// let c = VsockConfig::new(3).uds_path("/run/vm1/vsock.sock");
/// assert_eq!(c.guest_cid, 3);
/// assert!(c.uds_path.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 to `u32::MAX - 1`).
    pub guest_cid: u64,
    /// Where host programs connect (`CONNECT <port>\n`), and the prefix of the sockets
    /// guest-initiated connections go to (`<uds_path>_<port>`). `None`: in-process API only.
    pub uds_path: Option<PathBuf>,
}

impl VsockConfig {
    /// A configuration for guest CID `guest_cid` with no Unix socket.
    ///
    /// # Example
    /// See [`VsockConfig`].
    pub fn new(guest_cid: u64) -> VsockConfig {
        VsockConfig {
            guest_cid,
            uds_path: None,
        }
    }

    /// Sets [`uds_path`](Self::uds_path).
    ///
    /// # Example
    /// See [`VsockConfig`].
    pub fn uds_path(mut self, path: impl Into<PathBuf>) -> VsockConfig {
        self.uds_path = Some(path.into());
        self
    }
}

/// Why [`Vsock::new`] failed.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
/// assert!(matches!(Vsock::new(VsockConfig::new(2)), Err(VsockError::InvalidCid(2))));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host) and `u32::MAX` is VMADDR_CID_ANY.
    #[error("guest CID {0} is reserved: choose a CID from 3 to 4294967294")]
    InvalidCid(u64),
    /// The socket path does not fit `sun_path` with room for `_<port>`.
    #[error(
        "vsock socket path {path:?} is {len} bytes but at most {MAX_UDS_PATH_LEN} fit \
         (Unix socket addresses hold 107 and guest connections append _<port>): use a shorter path"
    )]
    PathTooLong {
        /// The configured path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Something exists at the socket path already.
    #[error(
        "vsock socket path {0:?} already exists: remove the stale socket or choose another path"
    )]
    PathExists(PathBuf),
    /// Binding the listening socket failed.
    #[error("cannot create the vsock socket at {path:?}: {source} (does the directory exist and is it writable?)")]
    Bind {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating the epoll or eventfd descriptors failed.
    #[error("vsock device setup failed ({what}): {source}")]
    Setup {
        /// What was being created.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Counters of what the device did ([`Vsock::stats`]).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::VsockStats;
/// assert_eq!(VsockStats::default().tx_packets, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets read from the tx queue (with a complete header).
    pub tx_packets: u64,
    /// Packets put in the rx queue.
    pub rx_packets: u64,
    /// Guest packets dropped: wrong CID, unsupported type, unknown op, bad length.
    pub dropped_packets: u64,
    /// Chains returned unused: queue chain errors, no complete header, rx buffers too small.
    pub malformed_chains: u64,
    /// RSTs sent for packets matching no connection and for connections the device reset.
    pub rst_sent: u64,
    /// RSTs not sent because [`MAX_ORPHAN_RST`](super::MAX_ORPHAN_RST) were queued.
    pub rst_dropped: u64,
    /// Connections reset because the guest sent more than its credit.
    pub credit_violations: u64,
    /// Connections created (both directions).
    pub connections_opened: u64,
    /// Connections open now.
    pub connections: u64,
    /// Payload bytes accepted from the guest.
    pub bytes_from_guest: u64,
    /// Payload bytes delivered to the guest.
    pub bytes_to_guest: u64,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: bool,
    /// An rx buffer popped when no packet turned out to be ready: used for the next one.
    spare_rx: Option<DescriptorChain>,
}

/// The virtio-vsock device (see the [module documentation](super)).
///
/// # Example
/// See the [module example](self).
pub struct Vsock {
    guest_cid: u64,
    features: u64,
    queue_max_sizes: [u16; 3],
    muxer: Muxer,
    host: Arc<HostShared>,
    active: Option<Active>,
    scratch: Vec<u8>,
}

impl fmt::Debug for Vsock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("activated", &self.active.is_some())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    let len = path.as_os_str().len();
    if len > MAX_UDS_PATH_LEN || sockaddr_un(path).is_err() {
        return Err(VsockError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    if path.symlink_metadata().is_ok() {
        return Err(VsockError::PathExists(path.to_owned()));
    }
    UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })
}

impl Vsock {
    /// A device for `config`, not yet activated; binds `uds_path` now (and removes it when
    /// dropped), so host programs can connect as soon as the guest driver is up.
    ///
    /// # Errors
    /// [`VsockError`]: a reserved CID, a socket path that is too long, exists or cannot be
    /// bound, or no epoll / eventfd.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        let cid = config.guest_cid;
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let listener = match &config.uds_path {
            Some(p) => Some((bind(p)?, p.clone())),
            None => None,
        };
        let (host, requests) = HostShared::new().map_err(|source| VsockError::Setup {
            what: "eventfd",
            source,
        })?;
        let muxer = match Muxer::new(cid, listener, host.clone(), requests) {
            Ok(m) => m,
            Err(source) => {
                if let Some(p) = &config.uds_path {
                    let _ = std::fs::remove_file(p);
                }
                return Err(VsockError::Setup {
                    what: "epoll",
                    source,
                });
            }
        };
        Ok(Vsock {
            guest_cid: cid,
            features: (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_F_RING_EVENT_IDX)
                | (1 << VIRTIO_F_RING_INDIRECT_DESC),
            queue_max_sizes: [QUEUE_SIZE; 3],
            muxer,
            host,
            active: None,
            scratch: vec![0; MAX_PKT_PAYLOAD as usize],
        })
    }

    /// The in-process API for this device; usable from any thread, also after the device
    /// moved into its transport.
    ///
    /// # Example
    /// See [`VsockHost`].
    pub fn host(&self) -> VsockHost {
        VsockHost::new(self.host.clone())
    }

    /// The guest's CID.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
    /// assert_eq!(Vsock::new(VsockConfig::new(7))?.guest_cid(), 7);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
    /// assert_eq!(Vsock::new(VsockConfig::new(3))?.stats().connections, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> VsockStats {
        VsockStats {
            connections: self.muxer.connection_count() as u64,
            ..self.muxer.stats
        }
    }

    /// Whether the driver made the device need a reset (a broken queue).
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
    /// assert!(!Vsock::new(VsockConfig::new(3))?.needs_reset());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn needs_reset(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.needs_reset)
    }

    /// Serves the tx queue; returns `true` when stopped early with chains possibly pending.
    fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if a.needs_reset || !a.queues[TX].ready {
            return false;
        }
        let mem = &a.mem;
        let q = &mut a.queues[TX];
        let mut served = 0;
        let mut completed = 0;
        let mut more = false;
        let mut fatal = false;
        'outer: loop {
            q.disable_notification(mem);
            loop {
                if served >= MAX_PACKETS_PER_CALL {
                    more = true;
                    break 'outer;
                }
                let head = match q.pop(mem) {
                    Ok(None) => break,
                    Ok(Some(chain)) => {
                        handle_tx(
                            &chain,
                            mem,
                            self.guest_cid,
                            &mut self.muxer,
                            &mut self.scratch,
                        );
                        chain.head_index()
                    }
                    Err(e) => match chain_error(e, &mut self.muxer.stats) {
                        Next::Return(head) => head,
                        Next::Skip => {
                            served += 1;
                            continue;
                        }
                        Next::Stop => break 'outer,
                        Next::Fatal => {
                            fatal = true;
                            break 'outer;
                        }
                    },
                };
                served += 1;
                if let Err(e) = q.add_used(mem, head, 0) {
                    log::warn!("virtio-vsock: cannot return a tx chain, needs reset: {e}");
                    fatal = true;
                    break 'outer;
                }
                completed += 1;
            }
            if !q.enable_notification(mem) {
                break;
            }
        }
        if more {
            q.enable_notification(mem);
        }
        if completed > 0 && q.needs_notification(mem) {
            a.interrupt.signal_used_queue(TX as u16);
        }
        if fatal {
            a.needs_reset = true;
            a.interrupt.set_needs_reset();
        }
        more
    }

    /// Fills rx buffers with what the muxer has for the guest; returns `true` when stopped
    /// early with packets possibly pending.
    fn process_rx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        if a.needs_reset || !a.queues[RX].ready {
            return false;
        }
        let mem = &a.mem;
        let q = &mut a.queues[RX];
        let mut sent = 0;
        let mut completed = 0;
        let mut more = false;
        let mut fatal = false;
        while self.muxer.has_rx() {
            if sent >= MAX_PACKETS_PER_CALL {
                more = true;
                break;
            }
            let chain = match a.spare_rx.take() {
                Some(c) => c,
                None => match q.pop(mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        // Out of buffers: ask for a notification, and go on if some arrived
                        // meanwhile.
                        if q.enable_notification(mem) {
                            continue;
                        }
                        break;
                    }
                    Err(e) => {
                        let head = match chain_error(e, &mut self.muxer.stats) {
                            Next::Return(head) => head,
                            Next::Skip => continue,
                            Next::Stop => break,
                            Next::Fatal => {
                                fatal = true;
                                break;
                            }
                        };
                        if let Err(e) = q.add_used(mem, head, 0) {
                            log::warn!("virtio-vsock: cannot return an rx chain, needs reset: {e}");
                            fatal = true;
                            break;
                        }
                        completed += 1;
                        sent += 1;
                        continue;
                    }
                },
            };
            let room = chain.writable_len();
            let len = if room < HDR_LEN as u64 {
                self.muxer.stats.malformed_chains += 1;
                0
            } else {
                let cap = (room - HDR_LEN as u64).min(self.scratch.len() as u64) as usize;
                let Some(hdr) = self.muxer.next_rx(&mut self.scratch[..cap]) else {
                    a.spare_rx = Some(chain);
                    break;
                };
                let n = hdr.len as usize;
                let ok = chain.write_all_at(mem, 0, &hdr.encode()).is_ok()
                    && chain
                        .write_all_at(mem, HDR_LEN as u64, &self.scratch[..n])
                        .is_ok();
                if ok {
                    self.muxer.stats.rx_packets += 1;
                    (HDR_LEN + n) as u32
                } else {
                    log::debug!("virtio-vsock: rx buffer not writable: packet lost");
                    self.muxer.stats.malformed_chains += 1;
                    0
                }
            };
            sent += 1;
            if let Err(e) = q.add_used(mem, chain.head_index(), len) {
                log::warn!("virtio-vsock: cannot return an rx chain, needs reset: {e}");
                fatal = true;
                break;
            }
            completed += 1;
        }
        if completed > 0 && q.needs_notification(mem) {
            a.interrupt.signal_used_queue(RX as u16);
        }
        if fatal {
            a.needs_reset = true;
            a.interrupt.set_needs_reset();
        }
        more
    }
}

/// What to do after a [`Queue::pop`] error (virtio-blk's rules).
enum Next {
    /// Return this head with used length 0 and go on.
    Return(u16),
    /// Nothing to return (an entry naming a head outside the table): go on.
    Skip,
    /// The queue is not usable now: stop quietly.
    Stop,
    /// The queue is broken: DEVICE_NEEDS_RESET.
    Fatal,
}

fn chain_error(e: QueueError, stats: &mut VsockStats) -> Next {
    if let Some(head) = e.chain_head() {
        log::debug!("virtio-vsock: bad chain: {e}");
        stats.malformed_chains += 1;
        return Next::Return(head);
    }
    match e {
        QueueError::HeadOutOfRange { .. } => {
            log::debug!("virtio-vsock: skipping available entry: {e}");
            stats.malformed_chains += 1;
            Next::Skip
        }
        QueueError::NotReady { .. } => Next::Stop,
        _ => {
            log::warn!("virtio-vsock: queue broken, needs reset: {e}");
            Next::Fatal
        }
    }
}

/// One tx chain: header, validation, payload, then the muxer.
fn handle_tx(
    chain: &DescriptorChain,
    mem: &GuestMemory,
    guest_cid: u64,
    muxer: &mut Muxer,
    scratch: &mut [u8],
) {
    let mut hb = [0u8; HDR_LEN];
    if chain.read_exact_at(mem, 0, &mut hb).is_err() {
        log::debug!(
            "virtio-vsock: tx chain of {} readable bytes has no header",
            chain.readable_len()
        );
        muxer.stats.malformed_chains += 1;
        return;
    }
    let hdr = PacketHeader::parse(&hb);
    muxer.stats.tx_packets += 1;
    let op = match hdr.validate(guest_cid, MAX_PKT_PAYLOAD) {
        Ok(op) => op,
        Err(e) => {
            log::debug!("virtio-vsock: dropping guest packet: {e}");
            muxer.stats.dropped_packets += 1;
            match e {
                PacketError::UnsupportedType(_) => muxer.reject(&hdr),
                PacketError::TooLong { .. } => muxer.abort(&hdr),
                _ => {}
            }
            return;
        }
    };
    let available = chain.readable_len() - HDR_LEN as u64;
    if u64::from(hdr.len) > available {
        log::debug!(
            "virtio-vsock: dropping guest packet: {}",
            PacketError::Truncated {
                len: hdr.len,
                available
            }
        );
        muxer.stats.dropped_packets += 1;
        muxer.abort(&hdr);
        return;
    }
    let payload: &[u8] = if op == Op::Rw {
        let n = hdr.len as usize;
        if chain
            .read_exact_at(mem, HDR_LEN as u64, &mut scratch[..n])
            .is_err()
        {
            muxer.stats.dropped_packets += 1;
            muxer.abort(&hdr);
            return;
        }
        &scratch[..n]
    } else {
        &[]
    };
    muxer.handle_guest(&hdr, op, payload);
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        crate::devices::virtio::device::read_config_bytes(&config, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-vsock: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for q in [RX, TX] {
            if !ctx.queues.get(q).is_some_and(|q| q.ready) {
                return Err(ActivateError::QueueNotReady(q as u16));
            }
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            needs_reset: false,
            spare_rx: None,
        });
        // Host connections made before the driver came up wait in the muxer.
        self.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) -> bool {
        match usize::from(queue) {
            RX => self.process_rx(),
            TX => {
                let more_tx = self.process_tx();
                let more_rx = self.process_rx();
                more_tx || more_rx
            }
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn host_events(&self) -> Vec<HostEvent> {
        vec![HostEvent {
            fd: self.muxer.epoll_fd(),
            token: MUXER_TOKEN,
            interest: HostInterest::READABLE,
        }]
    }

    fn host_event(&mut self, token: u32, _ready: HostInterest) -> bool {
        if token != MUXER_TOKEN {
            return false;
        }
        let more_events = self.muxer.process_events();
        let more_rx = self.process_rx();
        more_events || more_rx
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

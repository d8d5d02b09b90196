//! The virtio-blk device (virtio 1.2, section 5.2): one request queue served from a [`Disk`].
//!
//! # Requests
//!
//! A request is one descriptor chain: a 16-byte header `{ type: u32, reserved: u32, sector:
//! u64 }` at the start of the device-readable part, then data (readable for writes, writable
//! for reads), then a 1-byte status in the *last* device-writable byte. The device serves
//!
//! | type | what | data |
//! |---|---|---|
//! | [`VIRTIO_BLK_T_IN`] (0) | read from `sector` | writable bytes before the status, a multiple of 512 |
//! | [`VIRTIO_BLK_T_OUT`] (1) | write at `sector` | readable bytes after the header, a multiple of 512 |
//! | [`VIRTIO_BLK_T_FLUSH`] (4) | [`Disk::flush`] | none |
//! | [`VIRTIO_BLK_T_GET_ID`] (8) | the 20-byte serial ([`Disk::id`]), truncated to the buffer | writable, at least 1 byte |
//! | [`VIRTIO_BLK_T_DISCARD`] (11) | [`Disk::discard`] | segments `{ sector: u64, num_sectors: u32, flags: u32 }` |
//! | [`VIRTIO_BLK_T_WRITE_ZEROES`] (13) | [`Disk::write_zeroes`] (UNMAP or not: both free space where the disk can) | same segments |
//!
//! and answers with a status:
//!
//! - [`VIRTIO_BLK_S_OK`] when done.
//! - [`VIRTIO_BLK_S_UNSUPP`] for an unknown request type; DISCARD / WRITE_ZEROES when the feature
//!   was not negotiated, with unknown segment flags, or DISCARD with the UNMAP flag (the
//!   specification forbids it).
//! - [`VIRTIO_BLK_S_IOERR`] for everything else that fails: a host I/O error (for that request
//!   only; the device carries on), a sector range past the end of the disk or overflowing
//!   `u64` (checked arithmetic), a write / discard / write-zeroes on a read-only disk (the
//!   specification's choice for `VIRTIO_BLK_F_RO`), and malformed requests — no complete
//!   header, IN/OUT data that is not a multiple of 512 bytes or larger than
//!   [`MAX_REQUEST_BYTES`], an empty GET_ID buffer, a segment count that is zero or above the
//!   advertised maximum, a segment longer than the advertised maximum sectors.
//!
//! A chain with no writable byte at all cannot carry a status: it is returned with used length
//! 0. The used length is always the number of bytes the device wrote into the chain (data plus
//! status byte), never more than the chain's writable bytes.
//!
//! # Queue handling
//!
//! The queue's maximum size is [`QUEUE_SIZE`] (256, what Linux and QEMU use for virtio-blk).
//! `seg_max` is [`SEG_MAX`] = `QUEUE_SIZE - 2`: the queue refuses chains longer than its size,
//! and a request needs a header and a status descriptor besides its data segments.
//!
//! Chain errors from [`Queue::pop`] ([`QueueError::chain_head`] is `Some`) are returned with
//! used length 0 and processing goes on; an available-ring entry naming a head outside the
//! table is skipped; [`QueueError::AvailIndexJump`] and [`QueueError::RingAccess`] (also from
//! [`Queue::add_used`]) make the device call [`VirtioInterrupt::set_needs_reset`] and ignore the
//! queue until the driver resets it.
//!
//! One notification serves at most [`MAX_REQUESTS_PER_NOTIFY`] requests (4 × the queue size),
//! so a driver that keeps refilling the ring cannot hold the calling thread (a vCPU or the
//! device event loop) forever. [`Block::process_queue`] returns `true` when it stopped for
//! that reason with requests still pending; the caller must then call it (or
//! [`VirtioDevice::queue_notify`]) again after serving its other events — the driver will not
//! notify again for buffers it already made available.
//!
//! Data moves between guest memory and the disk through one reusable bounce buffer of
//! [`BOUNCE_BUFFER_LEN`] bytes, allocated when the device is created: no heap allocation per
//! request.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::block::{Block, DiskImage, DiskMode, OverlayTarget};
//! use smolvm::devices::virtio::{VirtioDevice, DEVICE_ID_BLOCK};
//!
//! let base = std::env::temp_dir().join(format!("smolvm-doc-blkdev-{}.img", std::process::id()));
//! std::fs::write(&base, vec![0u8; 1 << 20])?;
//! let disk = DiskImage::open(&base, DiskMode::Overlay(OverlayTarget::Memory))?;
//! let blk = Block::new(disk);
//! assert_eq!(blk.device_type(), DEVICE_ID_BLOCK);
//! let mut capacity = [0u8; 8];
//! blk.read_config(0, &mut capacity);
//! assert_eq!(u64::from_le_bytes(capacity), 2048); // 512-byte sectors
//! # drop(blk);
//! # std::fs::remove_file(&base)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;

use super::disk::{check_range, Disk, DISK_ID_LEN, OVERLAY_BLOCK_SIZE, SECTOR_SIZE};
use crate::devices::virtio::{
    ActivateContext, ActivateError, DescriptorChain, Queue, QueueError, VirtioDevice,
    VirtioInterrupt, DEVICE_ID_BLOCK, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;

/// Feature bit 1: `size_max` in the configuration is the largest data segment.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit 2: `seg_max` in the configuration is the most data segments per request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit 5: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit 6: `blk_size` in the configuration is the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit 9: [`VIRTIO_BLK_T_FLUSH`] is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit 13: [`VIRTIO_BLK_T_DISCARD`] is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit 14: [`VIRTIO_BLK_T_WRITE_ZEROES`] is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device identification string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard sector ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: zero sector ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error (or a malformed or refused request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Discard / write-zeroes segment flag: the range may be deallocated (WRITE_ZEROES only).
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (`seg_max`): the queue size minus the header and status
/// descriptors, so a maximal request still fits the queue's chain-length limit.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment (`size_max`), in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest IN / OUT data length accepted (`SEG_MAX × SIZE_MAX`); longer requests fail with
/// [`VIRTIO_BLK_S_IOERR`].
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes moved between guest memory and the disk per step (the reused bounce buffer).
pub const BOUNCE_BUFFER_LEN: usize = 256 * 1024;
/// Requests served per notification at most (4 × [`QUEUE_SIZE`]); see the
/// [module documentation](self#queue-handling).
pub const MAX_REQUESTS_PER_NOTIFY: usize = 4 * QUEUE_SIZE as usize;
/// Most sectors per discard / write-zeroes segment (`max_discard_sectors`,
/// `max_write_zeroes_sectors`): the largest `u32` that is a whole number of 4 KiB blocks
/// (just under 2 TiB).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX - (u32::MAX % (OVERLAY_BLOCK_SIZE as u32 / 512));
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Bytes of `struct virtio_blk_config` the device defines (up to `write_zeroes_may_unmap` and
/// its padding); reads beyond return zero.
pub const CONFIG_LEN: usize = 60;

/// Bytes of a request header.
const HEADER_LEN: u64 = 16;
/// Bytes of one discard / write-zeroes segment.
const SEGMENT_LEN: u64 = 16;

/// Counters of what the device did, readable with [`Block::stats`].
///
/// Request counters count requests by type as they arrive, whatever their outcome.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::BlockStats;
/// let s = BlockStats::default();
/// assert_eq!(s.reads + s.writes + s.io_errors, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// IN requests.
    pub reads: u64,
    /// OUT requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// GET_ID requests.
    pub get_ids: u64,
    /// DISCARD requests.
    pub discards: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Requests answered [`VIRTIO_BLK_S_UNSUPP`] (unknown types included).
    pub unsupported: u64,
    /// Requests answered [`VIRTIO_BLK_S_IOERR`].
    pub io_errors: u64,
    /// Chains returned without a status: queue chain errors and chains with no writable byte.
    pub malformed_chains: u64,
    /// Bytes read from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the disk.
    pub bytes_written: u64,
}

/// The device's state as plain data, for snapshots ([`Block::state`]).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::BlockState;
/// let s = BlockState { activated: false, acked_features: 0, queue: None, needs_reset: false };
/// assert!(!s.activated);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// The driver set DRIVER_OK and the device is serving its queue.
    pub activated: bool,
    /// Features the driver accepted (0 before activation).
    pub acked_features: u64,
    /// The request queue, when activated.
    pub queue: Option<Queue>,
    /// The device reported DEVICE_NEEDS_RESET and ignores its queue until reset.
    pub needs_reset: bool,
}

/// What an activated device holds.
struct Active {
    mem: GuestMemory,
    queue: Queue,
    features: u64,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: bool,
}

/// A virtio-blk device over a [`Disk`] (see the [module documentation](self)).
///
/// Generic over the disk so tests and benchmarks can use any backend; `Block<Box<dyn Disk>>`
/// (the default) takes any disk at run time.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::{Block, Disk, DiskImage, DiskMode, VIRTIO_BLK_F_RO};
/// use smolvm::devices::virtio::VirtioDevice;
///
/// let path = std::env::temp_dir().join(format!("smolvm-doc-blk-ro-{}.img", std::process::id()));
/// std::fs::write(&path, vec![0u8; 4096])?;
/// let disk: Box<dyn Disk> = Box::new(DiskImage::open(&path, DiskMode::ReadOnly)?);
/// let blk: Block = Block::new(disk);
/// assert_ne!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
/// # drop(blk);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Block<D: Disk = Box<dyn Disk>> {
    disk: D,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    active: Option<Active>,
    bounce: Vec<u8>,
    stats: BlockStats,
}

impl<D: Disk> fmt::Debug for Block<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("features", &format_args!("{:#x}", self.features))
            .field("state", &self.state())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<D: Disk> Block<D> {
    /// A device serving `disk`, not yet activated. Offers the features listed in the
    /// [module documentation](self), `VIRTIO_BLK_F_RO` for a read-only disk and
    /// DISCARD / WRITE_ZEROES for a writable one.
    ///
    /// # Example
    /// See [`Block`].
    pub fn new(disk: D) -> Self {
        let read_only = disk.is_read_only();
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_RING_INDIRECT_DESC)
            | (1 << VIRTIO_F_RING_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| {
            config[off..off + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &disk.sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        if !read_only {
            let align = (OVERLAY_BLOCK_SIZE / SECTOR_SIZE) as u32;
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEG.to_le_bytes());
            put(44, &align.to_le_bytes());
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &MAX_DISCARD_SEG.to_le_bytes());
            put(56, &[1]); // write_zeroes_may_unmap
        }
        Block {
            disk,
            features,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            active: None,
            bounce: vec![0; BOUNCE_BUFFER_LEN],
            stats: BlockStats::default(),
        }
    }

    /// The disk the device serves.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::block::{Block, Disk, DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-blk-disk-{}.img", std::process::id()));
    /// # std::fs::write(&path, vec![0u8; 4096])?;
    /// let blk = Block::new(DiskImage::open(&path, DiskMode::ReadOnly)?);
    /// assert_eq!(blk.disk().size(), 4096);
    /// # drop(blk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// The device's counters.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::block::{Block, DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-blk-stats-{}.img", std::process::id()));
    /// # std::fs::write(&path, vec![0u8; 4096])?;
    /// let blk = Block::new(DiskImage::open(&path, DiskMode::ReadOnly)?);
    /// assert_eq!(blk.stats().reads, 0);
    /// # drop(blk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// The device's state as plain data (for snapshots).
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::block::{Block, DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-blk-state-{}.img", std::process::id()));
    /// # std::fs::write(&path, vec![0u8; 4096])?;
    /// let blk = Block::new(DiskImage::open(&path, DiskMode::ReadOnly)?);
    /// assert!(!blk.state().activated && blk.state().queue.is_none());
    /// # drop(blk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn state(&self) -> BlockState {
        match &self.active {
            Some(a) => BlockState {
                activated: true,
                acked_features: a.features,
                queue: Some(a.queue.clone()),
                needs_reset: a.needs_reset,
            },
            None => BlockState {
                activated: false,
                acked_features: 0,
                queue: None,
                needs_reset: false,
            },
        }
    }

    /// Serves the request queue: pops and completes requests until the ring is empty (with
    /// notifications re-enabled and re-checked) or [`MAX_REQUESTS_PER_NOTIFY`] requests were
    /// served, then interrupts the driver if the queue's notification suppression asks for it.
    ///
    /// Returns `true` when it stopped at the limit with requests possibly still pending: call
    /// it again (after serving other events); the driver will not notify for them. Does
    /// nothing (returns `false`) before activation or after a DEVICE_NEEDS_RESET.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::block::{Block, DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-blk-pq-{}.img", std::process::id()));
    /// # std::fs::write(&path, vec![0u8; 4096])?;
    /// let mut blk = Block::new(DiskImage::open(&path, DiskMode::ReadOnly)?);
    /// assert!(!blk.process_queue()); // not activated: nothing to do
    /// # drop(blk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn process_queue(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if active.needs_reset || !active.queue.ready {
            return false;
        }
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut ctx = RequestCtx {
            disk: &mut self.disk,
            bounce: &mut self.bounce,
            stats: &mut self.stats,
            features: active.features,
            mem,
        };
        let mut served = 0usize;
        let mut completed = 0usize;
        let mut more = false;
        let mut fatal = false;
        'outer: loop {
            queue.disable_notification(mem);
            loop {
                if served >= MAX_REQUESTS_PER_NOTIFY {
                    more = true;
                    break 'outer;
                }
                let (head, len) = match queue.pop(mem) {
                    Ok(None) => break,
                    Ok(Some(chain)) => (chain.head_index(), ctx.handle(&chain)),
                    Err(e) => match e.chain_head() {
                        Some(head) => {
                            log::debug!("virtio-blk: bad chain: {e}");
                            ctx.stats.malformed_chains += 1;
                            (head, 0)
                        }
                        None => match e {
                            QueueError::HeadOutOfRange { .. } => {
                                log::debug!("virtio-blk: skipping available entry: {e}");
                                ctx.stats.malformed_chains += 1;
                                served += 1;
                                continue;
                            }
                            QueueError::NotReady { .. } => break 'outer,
                            _ => {
                                log::warn!("virtio-blk: queue broken, needs reset: {e}");
                                fatal = true;
                                break 'outer;
                            }
                        },
                    },
                };
                served += 1;
                if let Err(e) = queue.add_used(mem, head, len) {
                    log::warn!("virtio-blk: cannot return chain, needs reset: {e}");
                    fatal = true;
                    break 'outer;
                }
                completed += 1;
            }
            if !queue.enable_notification(mem) {
                break;
            }
        }
        if more {
            // Let the driver's next kick through even if the caller forgets to come back.
            queue.enable_notification(mem);
        }
        if completed > 0 && queue.needs_notification(mem) {
            active.interrupt.signal_used_queue(0);
        }
        if fatal {
            active.needs_reset = true;
            active.interrupt.set_needs_reset();
        }
        more
    }
}

/// What serving one request needs, borrowed from the device.
struct RequestCtx<'a, D: Disk> {
    disk: &'a mut D,
    bounce: &'a mut [u8],
    stats: &'a mut BlockStats,
    features: u64,
    mem: &'a GuestMemory,
}

/// Outcome of a request: its status and the data bytes written into the chain.
type Outcome = (u8, u64);

impl<D: Disk> RequestCtx<'_, D> {
    /// Serves one chain; returns the used length.
    fn handle(&mut self, chain: &DescriptorChain) -> u32 {
        let wlen = chain.writable_len();
        if wlen == 0 {
            self.stats.malformed_chains += 1;
            return 0;
        }
        let status_off = wlen - 1;
        let (status, written) = self.execute(chain, status_off);
        match status {
            VIRTIO_BLK_S_IOERR => self.stats.io_errors += 1,
            VIRTIO_BLK_S_UNSUPP => self.stats.unsupported += 1,
            _ => {}
        }
        let status_written = matches!(chain.write_at(self.mem, status_off, &[status]), Ok(1));
        let used = written + u64::from(status_written);
        debug_assert!(used <= wlen, "used length {used} > writable bytes {wlen}");
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    fn execute(&mut self, chain: &DescriptorChain, data_len_w: u64) -> Outcome {
        let mut hdr = [0u8; HEADER_LEN as usize];
        if chain.read_exact_at(self.mem, 0, &mut hdr).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let data_len_r = chain.readable_len() - HEADER_LEN;
        match req_type {
            VIRTIO_BLK_T_IN => {
                self.stats.reads += 1;
                self.read(chain, sector, data_len_w)
            }
            VIRTIO_BLK_T_OUT => {
                self.stats.writes += 1;
                (self.write(chain, sector, data_len_r), 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                match self.disk.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        log::debug!("virtio-blk: flush failed: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                self.stats.get_ids += 1;
                if data_len_w == 0 {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let id = self.disk.id();
                let n = (DISK_ID_LEN as u64).min(data_len_w) as usize;
                match chain.write_at(self.mem, 0, &id[..n]) {
                    Ok(w) if w == n => (VIRTIO_BLK_S_OK, w as u64),
                    Ok(w) => (VIRTIO_BLK_S_IOERR, w as u64),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let feature = if discard {
                    self.stats.discards += 1;
                    VIRTIO_BLK_F_DISCARD
                } else {
                    self.stats.write_zeroes += 1;
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if self.disk.is_read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                if self.features & (1 << feature) == 0 {
                    return (VIRTIO_BLK_S_UNSUPP, 0);
                }
                (self.zero(chain, discard, data_len_r), 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Byte offset and length of `len` data bytes at `sector`, checked against the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        check_range(offset, len, self.disk.size()).ok()?;
        Some(offset)
    }

    fn read(&mut self, chain: &DescriptorChain, sector: u64, len: u64) -> Outcome {
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let Some(offset) = self.range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(self.bounce.len() as u64) as usize;
            let buf = &mut self.bounce[..n];
            if let Err(e) = self.disk.read_at(offset + pos, buf) {
                log::debug!("virtio-blk: read at {:#x} failed: {e}", offset + pos);
                return (VIRTIO_BLK_S_IOERR, pos);
            }
            match chain.write_at(self.mem, pos, buf) {
                Ok(w) if w == n => {}
                Ok(w) => return (VIRTIO_BLK_S_IOERR, pos + w as u64),
                Err(_) => return (VIRTIO_BLK_S_IOERR, pos),
            }
            pos += n as u64;
        }
        self.stats.bytes_read += len;
        (VIRTIO_BLK_S_OK, len)
    }

    fn write(&mut self, chain: &DescriptorChain, sector: u64, len: u64) -> u8 {
        if self.disk.is_read_only() || len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(self.bounce.len() as u64) as usize;
            let buf = &mut self.bounce[..n];
            if chain
                .read_exact_at(self.mem, HEADER_LEN + pos, buf)
                .is_err()
            {
                return VIRTIO_BLK_S_IOERR;
            }
            if let Err(e) = self.disk.write_at(offset + pos, buf) {
                log::debug!("virtio-blk: write at {:#x} failed: {e}", offset + pos);
                return VIRTIO_BLK_S_IOERR;
            }
            self.stats.bytes_written += n as u64;
            pos += n as u64;
        }
        VIRTIO_BLK_S_OK
    }

    /// DISCARD / WRITE_ZEROES with `len` bytes of segments after the header.
    fn zero(&mut self, chain: &DescriptorChain, discard: bool, len: u64) -> u8 {
        if len == 0 || len % SEGMENT_LEN != 0 || len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEG) {
            return VIRTIO_BLK_S_IOERR;
        }
        for i in 0..len / SEGMENT_LEN {
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if chain
                .read_exact_at(self.mem, HEADER_LEN + i * SEGMENT_LEN, &mut seg)
                .is_err()
            {
                return VIRTIO_BLK_S_IOERR;
            }
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (discard && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
            {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if num_sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let bytes = u64::from(num_sectors) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let r = if discard {
                self.disk.discard(offset, bytes)
            } else {
                self.disk.write_zeroes(offset, bytes)
            };
            if let Err(e) = r {
                log::debug!("virtio-blk: discard/write-zeroes at {offset:#x} failed: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

impl<D: Disk> VirtioDevice for Block<D> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
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
        // `writeback` needs VIRTIO_BLK_F_CONFIG_WCE, which is not offered: nothing is writable.
        log::debug!(
            "virtio-blk: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let Some(queue) = ctx.queues.into_iter().next().filter(|q| q.ready) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            features: ctx.features,
            interrupt: ctx.interrupt,
            needs_reset: false,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) -> bool {
        queue == 0 && self.process_queue()
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

//! Host-side storage for block devices: a disk image file used read-write, read-only, or
//! underneath a private copy-on-write overlay.
//!
//! This module knows nothing about virtio. It turns "read/write/flush/discard/write-zeroes
//! `len` bytes at byte `offset`" into system calls on a raw image file (a regular file or a
//! host block device), with every offset bounds-checked, and it is what the virtio-blk device
//! sits on.
//!
//! # Modes
//!
//! | [`DiskMode`] | base image opened | writes go to | base lock |
//! |---|---|---|---|
//! | [`ReadWrite`](DiskMode::ReadWrite) | `O_RDWR` | the image itself | exclusive |
//! | [`ReadOnly`](DiskMode::ReadOnly) | `O_RDONLY` | rejected ([`DiskError::ReadOnly`]) | shared |
//! | [`Overlay`](DiskMode::Overlay) | `O_RDONLY` | a private overlay: a sparse file or memory | shared |
//!
//! In `ReadOnly` and `Overlay` modes the base file descriptor is opened without write access,
//! so the base image provably cannot be modified through it; any number of VMs can share one
//! base image without copying it.
//!
//! # Locking
//!
//! Images are locked with `flock(2)` (advisory, per open file, so two disks in one process
//! conflict exactly like two VMs in two processes): `ReadWrite` takes `LOCK_EX`, `ReadOnly`
//! and `Overlay` take `LOCK_SH` on the base, and an overlay file takes `LOCK_EX`. Conflicts
//! fail at once (`LOCK_NB`) with [`DiskError::LockedByOthers`] (a writer found other users),
//! [`DiskError::LockedByWriter`] (a reader found a writer) or [`DiskError::OverlayInUse`]. The
//! locks go away with the file descriptors, also when a process dies. Other programs that do
//! not use `flock` are not stopped, and on NFS `flock` is emulated with per-process POSIX
//! locks, so conflicts inside one process go unnoticed there.
//!
//! # Why a trait and one concrete type
//!
//! [`Disk`] is a trait so the block device can be written (and unit-tested) against any
//! storage: an embedder can plug in its own backend, and tests can use a small in-memory
//! disk. [`DiskImage`] is the one implementation this crate ships; internally it is an enum
//! over its modes (a closed set), which keeps the per-request dispatch a `match` instead of a
//! second layer of trait objects. The cost of one dynamic call per request is nothing next to
//! the `pread`/`pwrite` behind it.
//!
//! # Overlays
//!
//! An overlay tracks which *blocks* of [`OVERLAY_BLOCK_SIZE`] (4 KiB) it holds in a bitmap,
//! one bit per block (32 KiB of memory per GiB of disk). 4 KiB is the page size and the usual
//! file-system block size, and Linux guests issue block I/O in 4 KiB multiples, so a
//! copy-on-write rarely needs to read the base first; smaller blocks would multiply the bitmap
//! and the number of system calls, larger ones the bytes copied up on small writes (and the
//! memory a memory overlay spends per touched block).
//!
//! - A read is split into runs of blocks that are all in the overlay or all not, and each run
//!   is one `pread` from the overlay or the base.
//! - A write that covers whole blocks goes straight to the overlay; a write that covers only
//!   part of a block not yet in the overlay first copies that block up from the base.
//! - Discard and write-zeroes mark the blocks as *in the overlay and zero* (the hole is
//!   punched in an overlay file, the block freed in a memory overlay), so the base bytes never
//!   show through again.
//!
//! [`OverlayTarget::Memory`] keeps blocks in a hash map, at most the disk's size (it grows
//! with what the guest writes; untouched and zeroed blocks cost nothing). An
//! [`OverlayTarget::File`] is a sparse file of the base's size holding blocks at their own
//! offsets (so it reads like a raw image wherever the bitmap says "in the overlay"); it is
//! created with mode `0600`.
//!
//! ## Kept overlay files and the block map
//!
//! With `keep: false` the overlay file is unlinked right after it is opened: it lives only as
//! long as the disk and disappears even if the process crashes, and [`Disk::flush`] does not
//! sync it (its content dies with the VM anyway). With `keep: true` the bitmap is saved next
//! to the overlay in a sidecar file, the overlay's path with `.map` appended
//! (`vm1.overlay` → `vm1.overlay.map`). The map is written when the disk is created, on every
//! [`Disk::flush`] that follows new blocks (after `fdatasync` of the overlay, so the map never
//! names data that is not on disk), and when the disk is dropped; it is replaced atomically
//! (written to `<map>.tmp`, synced, renamed). Writes not yet flushed may be lost in a crash,
//! as on any disk. The format, all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SMOLVMOV` |
//! | 8 | 4 | version, 1 |
//! | 12 | 4 | block size in bytes, 4096 |
//! | 16 | 8 | base image size in bytes |
//! | 24 | 8 | base image mtime, seconds since the epoch (signed) |
//! | 32 | 4 | base image mtime, nanoseconds |
//! | 36 | 4 | reserved, 0 |
//! | 40 | 8 | number of blocks `n` = ceil(size / 4096) |
//! | 48 | ceil(n / 8) | bitmap: bit `i % 8` of byte `i / 8` set = block `i` is in the overlay |
//!
//! Reopening (`if_exists: IfOverlayExists::Reuse`) checks that the base still has the
//! recorded size and modification time and refuses ([`DiskError::OverlayBaseChanged`])
//! otherwise: an overlay on top of a different base would mix blocks from two images.
//!
//! # Discard and write-zeroes
//!
//! Both make the range read back as zeroes. On Linux a range of a writable file is freed with
//! `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`; where the file system (or the OS,
//! e.g. macOS) does not support that, zeroes are written instead — the same result, without
//! freeing space, and slow for large ranges.
//!
//! # Untrusted offsets
//!
//! Offsets and lengths come from the guest: every request is checked with
//! [`check_range`] (`offset + len` with overflow checking, against the disk size) and a bad
//! one is a [`DiskError::OutOfRange`], never a panic. Requests allocate nothing, except that a
//! memory overlay allocates a block the first time the guest writes it.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::block::disk::{Disk, DiskImage, DiskMode, OverlayTarget};
//!
//! let base = std::env::temp_dir().join(format!("smolvm-doc-disk-{}.img", std::process::id()));
//! std::fs::write(&base, vec![7u8; 8192])?;
//!
//! // Two sandboxes share the base image; each writes into its own memory overlay.
//! let mut a = DiskImage::open(&base, DiskMode::Overlay(OverlayTarget::Memory))?;
//! let b = DiskImage::open(&base, DiskMode::Overlay(OverlayTarget::Memory))?;
//! a.write_at(4096, b"private to a")?;
//!
//! let mut buf = [0u8; 12];
//! a.read_at(4096, &mut buf)?;
//! assert_eq!(&buf, b"private to a");
//! b.read_at(4096, &mut buf)?;
//! assert_eq!(buf, [7u8; 12]);
//! assert_eq!(std::fs::read(&base)?, vec![7u8; 8192]); // the base is untouched
//! # drop((a, b));
//! # std::fs::remove_file(&base)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Bytes per sector: the unit virtio-blk addresses the disk in. Disk sizes must be a multiple.
pub const SECTOR_SIZE: u64 = 512;

/// Granularity of an overlay's copy-on-write tracking: one bitmap bit per block of this many
/// bytes (see the [module documentation](self#overlays) for why 4 KiB).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::OVERLAY_BLOCK_SIZE;
/// // One bit per block: a 1 GiB disk needs a 32 KiB bitmap.
/// assert_eq!((1u64 << 30) / OVERLAY_BLOCK_SIZE / 8, 32 * 1024);
/// ```
pub const OVERLAY_BLOCK_SIZE: u64 = 4096;

/// Length of a disk's identification string (virtio-blk `VIRTIO_BLK_T_GET_ID` answers with
/// exactly this many bytes, zero-padded; the guest shows it as the disk's serial).
pub const DISK_ID_LEN: usize = 20;

/// [`OVERLAY_BLOCK_SIZE`] as a `usize`, for buffers.
const BLOCK: usize = OVERLAY_BLOCK_SIZE as usize;

/// Zero source for writing zeroes where holes cannot be punched.
static ZEROES: [u8; 256 * 1024] = [0; 256 * 1024];

/// First bytes of an overlay block map file.
const MAP_MAGIC: &[u8; 8] = b"SMOLVMOV";
/// Version of the block map format this code reads and writes.
const MAP_VERSION: u32 = 1;
/// Size of the block map header; the bitmap follows.
const MAP_HEADER_LEN: usize = 48;

/// Errors opening a disk or serving a request. Messages name the file and what to do.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{DiskError, DiskImage, DiskMode};
///
/// let err = DiskImage::open("/nonexistent/smolvm-disk.img", DiskMode::ReadOnly).unwrap_err();
/// assert!(matches!(err, DiskError::NotFound { .. }));
/// assert!(err.to_string().contains("does not exist"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The disk image path does not exist.
    #[error(
        "disk image {} does not exist: check the path (a relative path is taken from the \
         current directory) or create the image first",
        .path.display()
    )]
    NotFound {
        /// The image path as given.
        path: PathBuf,
    },
    /// The process may not open the image with the access the mode needs.
    #[error(
        "permission denied opening disk image {} for {access}: give this process {access} \
         permission on the file, or use DiskMode::ReadOnly or DiskMode::Overlay if the VM \
         only needs to read it",
        .path.display()
    )]
    PermissionDenied {
        /// The image path as given.
        path: PathBuf,
        /// `"reading"` or `"reading and writing"`.
        access: &'static str,
    },
    /// `ReadWrite` was asked for an image on a read-only file system.
    #[error(
        "disk image {} is on a read-only file system, so it cannot be opened read-write: use \
         DiskMode::ReadOnly, or DiskMode::Overlay with the overlay on a writable file system",
        .path.display()
    )]
    ReadOnlyFileSystem {
        /// The image path as given.
        path: PathBuf,
    },
    /// The path names something other than a regular file or a block device.
    #[error(
        "{} is {what}, not a disk image: give the path of a raw image file or a block device",
        .path.display()
    )]
    NotADiskImage {
        /// The path as given.
        path: PathBuf,
        /// What it is instead, e.g. `"a directory"`.
        what: &'static str,
    },
    /// The image is 0 bytes long.
    #[error(
        "disk image {} is empty (0 bytes): a disk needs at least one 512-byte sector; size it \
         first, e.g. `truncate -s 1G {}`",
        .path.display(), .path.display()
    )]
    Empty {
        /// The image path as given.
        path: PathBuf,
    },
    /// The image size is not a whole number of 512-byte sectors.
    #[error(
        "disk image {} is {size} bytes, which is not a multiple of the 512-byte sector size: \
         resize it to a whole number of sectors, e.g. `truncate -s {} {}`",
        .path.display(), .size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE, .path.display()
    )]
    SizeNotSectorMultiple {
        /// The image path as given.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// `ReadWrite` found the image already open (in any mode) by another disk.
    #[error(
        "disk image {} is already in use by another VM or process (read-write, read-only or \
         as an overlay base), and read-write use needs it alone: stop the other user, or open \
         this disk with DiskMode::ReadOnly or DiskMode::Overlay",
        .path.display()
    )]
    LockedByOthers {
        /// The image path as given.
        path: PathBuf,
    },
    /// `ReadOnly` or `Overlay` found the image open read-write by another disk.
    #[error(
        "disk image {} is open read-write by another VM or process, so it cannot be shared \
         read-only or as an overlay base while it changes: stop the writer first",
        .path.display()
    )]
    LockedByWriter {
        /// The image path as given.
        path: PathBuf,
    },
    /// Locking the image failed for a reason other than a conflict.
    #[error("cannot lock disk image {}: {source}", .path.display())]
    Lock {
        /// The locked path.
        path: PathBuf,
        /// What `flock` said.
        source: io::Error,
    },
    /// Opening the image failed for another reason.
    #[error("cannot open disk image {}: {source}", .path.display())]
    Open {
        /// The image path as given.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The overlay file exists and [`IfOverlayExists::Refuse`] was asked for.
    #[error(
        "overlay file {} already exists; refusing to overwrite it: pick another path, delete \
         it, or set if_exists to IfOverlayExists::Reuse (continue from it) or \
         IfOverlayExists::Replace (start over)",
        .path.display()
    )]
    OverlayExists {
        /// The existing file (the overlay or its `.map`).
        path: PathBuf,
    },
    /// The overlay path names the base image itself (the same file, perhaps via a link).
    #[error(
        "overlay file {} is the base image itself: the overlay must be a different file, or \
         the base would be overwritten",
        .path.display()
    )]
    OverlayIsBase {
        /// The overlay (or map) path as given.
        path: PathBuf,
    },
    /// The overlay file is locked by another disk.
    #[error(
        "overlay file {} is in use by another VM or process, and an overlay has a single \
         user: stop the other user or pick another overlay path",
        .path.display()
    )]
    OverlayInUse {
        /// The overlay path as given.
        path: PathBuf,
    },
    /// [`IfOverlayExists::Reuse`] found the overlay but not its block map.
    #[error(
        "overlay file {} exists but its block map {} is missing, so which blocks it holds is \
         unknown (was it created with keep: false?): restore the map, or start over with \
         IfOverlayExists::Replace",
        .path.display(), .map.display()
    )]
    OverlayMapMissing {
        /// The overlay path.
        path: PathBuf,
        /// The expected map path.
        map: PathBuf,
    },
    /// [`IfOverlayExists::Reuse`] found an overlay or map it cannot use.
    #[error(
        "overlay {} cannot be reused: {reason}; restore it, or start over with \
         IfOverlayExists::Replace",
        .path.display()
    )]
    OverlayInvalid {
        /// The overlay or map path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// [`IfOverlayExists::Reuse`] found that the base image changed since the overlay was made.
    #[error(
        "overlay {} was made on top of a different version of base image {} ({what} \
         changed), and reading through it would mix blocks of two images: use the original \
         base, or start over with IfOverlayExists::Replace",
        .path.display(), .base.display()
    )]
    OverlayBaseChanged {
        /// The overlay path.
        path: PathBuf,
        /// The base image path.
        base: PathBuf,
        /// `"size"` or `"modification time"`.
        what: &'static str,
    },
    /// Creating, opening, sizing, saving or deleting an overlay file failed.
    #[error(
        "overlay file {}: {source} (check that its directory exists, is writable and has \
         space)",
        .path.display()
    )]
    Overlay {
        /// The overlay or map path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A write, discard or write-zeroes request on a read-only disk.
    #[error(
        "write to a read-only disk: open the image with DiskMode::ReadWrite to change it, or \
         with DiskMode::Overlay to keep the VM's writes private"
    )]
    ReadOnly,
    /// A request reaches past the end of the disk (or its end overflows `u64`).
    #[error("request for {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Start of the request in bytes.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Disk size in bytes.
        size: u64,
    },
    /// [`DiskImage::with_id`] got an unusable identification string.
    #[error("invalid disk ID {id:?}: use at most 20 printable ASCII characters without spaces")]
    InvalidId {
        /// The rejected ID.
        id: String,
    },
    /// A read, write or sync on an open disk failed.
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes, without overflow.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{check_range, DiskError};
/// assert!(check_range(512, 512, 1024).is_ok());
/// assert!(check_range(1024, 0, 1024).is_ok());
/// assert!(matches!(check_range(1024, 1, 1024), Err(DiskError::OutOfRange { .. })));
/// assert!(matches!(check_range(u64::MAX, 2, 1024), Err(DiskError::OutOfRange { .. })));
/// ```
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// Storage a block device reads and writes: a fixed-size array of bytes.
///
/// Offsets and lengths are in bytes; implementations reject requests outside
/// `0..size()` with [`DiskError::OutOfRange`] (see [`check_range`]) and mutating requests on a
/// read-only disk with [`DiskError::ReadOnly`].
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{Disk, DiskImage, DiskMode, OverlayTarget};
///
/// /// What a block device does with a guest request, on any disk.
/// fn copy_first_sector(disk: &mut dyn Disk, to: u64) -> Result<(), Box<dyn std::error::Error>> {
///     let mut sector = [0u8; 512];
///     disk.read_at(0, &mut sector)?;
///     disk.write_at(to, &sector)?;
///     disk.flush()?;
///     Ok(())
/// }
///
/// let path = std::env::temp_dir().join(format!("smolvm-doc-trait-{}.img", std::process::id()));
/// std::fs::write(&path, [1u8; 2048])?;
/// let mut disk = DiskImage::open(&path, DiskMode::Overlay(OverlayTarget::Memory))?;
/// copy_first_sector(&mut disk, 1024)?;
/// assert_eq!(disk.sectors(), 4);
/// # drop(disk);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Disk: Send {
    /// Size of the disk in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;

    /// Size of the disk in 512-byte sectors (what virtio-blk reports as its capacity).
    fn sectors(&self) -> u64 {
        self.size() / SECTOR_SIZE
    }

    /// Whether writes, discards and write-zeroes are rejected.
    fn is_read_only(&self) -> bool;

    /// The identification string, zero-padded to [`DISK_ID_LEN`] bytes (all zero: none).
    fn id(&self) -> [u8; DISK_ID_LEN] {
        [0; DISK_ID_LEN]
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;

    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;

    /// Makes completed writes durable (`fdatasync` where that matters).
    fn flush(&mut self) -> Result<(), DiskError>;

    /// Tells the disk the range is unused. Here it always reads back as zeroes afterwards,
    /// and space is freed where the storage can.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// Makes the range read back as zeroes, freeing space where the storage can.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;
}

impl<D: Disk + ?Sized> Disk for Box<D> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn sectors(&self) -> u64 {
        (**self).sectors()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn id(&self) -> [u8; DISK_ID_LEN] {
        (**self).id()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        (**self).write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        (**self).write_zeroes(offset, len)
    }
}

/// How a [`DiskImage`] uses its image file.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{DiskMode, OverlayTarget};
/// // A root file system shared by every sandbox, with each sandbox's changes in memory:
/// let mode = DiskMode::Overlay(OverlayTarget::Memory);
/// assert!(!mode.writes_base());
/// assert!(DiskMode::ReadWrite.writes_base());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMode {
    /// Reads and writes go to the image file itself; the image is locked exclusively.
    ReadWrite,
    /// Reads come from the image; writes are rejected. Many disks may share the image.
    ReadOnly,
    /// Reads come from the image except where the VM wrote; writes go to a private overlay
    /// and never reach the image. Many disks may share the image.
    Overlay(OverlayTarget),
}

impl DiskMode {
    /// Whether this mode opens the image file for writing (only [`DiskMode::ReadWrite`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::DiskMode;
    /// assert!(!DiskMode::ReadOnly.writes_base());
    /// ```
    pub fn writes_base(&self) -> bool {
        matches!(self, DiskMode::ReadWrite)
    }
}

/// Where an overlay keeps the VM's writes.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{IfOverlayExists, OverlayTarget};
/// // Throw-away scratch file, never overwriting an existing file:
/// let scratch = OverlayTarget::scratch_file("/var/tmp/vm1.overlay");
/// assert_eq!(
///     scratch,
///     OverlayTarget::File {
///         path: "/var/tmp/vm1.overlay".into(),
///         keep: false,
///         if_exists: IfOverlayExists::Refuse,
///     }
/// );
/// // A sandbox disk that survives restarts: created once, continued afterwards.
/// let kept = OverlayTarget::persistent_file("/var/lib/sandboxes/vm1.overlay");
/// assert!(matches!(kept, OverlayTarget::File { keep: true, if_exists: IfOverlayExists::Reuse, .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayTarget {
    /// Blocks the VM writes stay in this process's memory, up to the disk size, and are gone
    /// when the disk is dropped.
    Memory,
    /// Blocks the VM writes go to a sparse file of the base's size.
    File {
        /// The overlay file. With `keep`, its block map is `<path>.map`.
        path: PathBuf,
        /// Keep the overlay (and its block map) when the disk is dropped, so it can be
        /// reopened with [`IfOverlayExists::Reuse`]. Without it the file is unlinked as soon as
        /// it is open, and disappears with the disk even if the process crashes.
        keep: bool,
        /// What to do when `path` already exists.
        if_exists: IfOverlayExists,
    },
}

impl OverlayTarget {
    /// A throw-away overlay file: `keep: false`, refusing to overwrite an existing file.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::OverlayTarget;
    /// assert!(matches!(OverlayTarget::scratch_file("x.overlay"), OverlayTarget::File { keep: false, .. }));
    /// ```
    pub fn scratch_file(path: impl Into<PathBuf>) -> Self {
        OverlayTarget::File {
            path: path.into(),
            keep: false,
            if_exists: IfOverlayExists::Refuse,
        }
    }

    /// A kept overlay file: created on first use, continued from on later ones
    /// (`keep: true`, [`IfOverlayExists::Reuse`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::OverlayTarget;
    /// assert!(matches!(OverlayTarget::persistent_file("x.overlay"), OverlayTarget::File { keep: true, .. }));
    /// ```
    pub fn persistent_file(path: impl Into<PathBuf>) -> Self {
        OverlayTarget::File {
            path: path.into(),
            keep: true,
            if_exists: IfOverlayExists::Reuse,
        }
    }
}

/// What opening an [`OverlayTarget::File`] does when the file already exists.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::IfOverlayExists;
/// assert_eq!(IfOverlayExists::default(), IfOverlayExists::Refuse);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IfOverlayExists {
    /// Fail with [`DiskError::OverlayExists`]; never touch an existing file.
    #[default]
    Refuse,
    /// Continue from the existing overlay, which needs its `.map` (it was created with
    /// `keep: true`) and the same base image; create it when it does not exist.
    Reuse,
    /// Delete the existing overlay and its map, and start with an empty overlay.
    Replace,
}

/// A disk image file opened in a [`DiskMode`]: the [`Disk`] this crate's block device uses.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::block::disk::{Disk, DiskError, DiskImage, DiskMode};
///
/// let path = std::env::temp_dir().join(format!("smolvm-doc-image-{}.img", std::process::id()));
/// std::fs::write(&path, vec![0u8; 1 << 20])?;
///
/// let mut disk = DiskImage::open(&path, DiskMode::ReadWrite)?.with_id("rootfs")?;
/// disk.write_at(512, b"hello")?;
/// disk.flush()?;
/// assert_eq!(disk.sectors(), 2048);
/// assert_eq!(&disk.id()[..6], b"rootfs");
///
/// // A second writer is refused while the first one is open.
/// assert!(matches!(
///     DiskImage::open(&path, DiskMode::ReadWrite),
///     Err(DiskError::LockedByOthers { .. })
/// ));
/// # drop(disk);
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DiskImage {
    path: PathBuf,
    mode: DiskMode,
    size: u64,
    id: [u8; DISK_ID_LEN],
    backend: Backend,
}

/// The per-mode state of a [`DiskImage`].
enum Backend {
    /// `ReadWrite` or `ReadOnly`: requests go to the image file.
    Raw {
        file: File,
        writable: bool,
        /// Cleared after the file system said it cannot punch holes.
        punch: bool,
    },
    /// `Overlay`.
    Overlay(Overlay),
}

impl DiskImage {
    /// Opens the disk image at `path` (a raw image file or a block device) in `mode`.
    ///
    /// The image must be a non-zero multiple of [`SECTOR_SIZE`] bytes. See the
    /// [module documentation](self) for the locks taken and the overlay's files.
    ///
    /// # Errors
    /// [`DiskError::NotFound`], [`DiskError::PermissionDenied`],
    /// [`DiskError::SizeNotSectorMultiple`], the lock conflicts, the overlay errors, … — each
    /// message says what to do.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::{Disk, DiskError, DiskImage, DiskMode};
    ///
    /// let path = std::env::temp_dir().join(format!("smolvm-doc-open-{}.img", std::process::id()));
    /// std::fs::write(&path, [0u8; 1000])?; // not whole sectors
    /// let err = DiskImage::open(&path, DiskMode::ReadOnly).unwrap_err();
    /// assert!(matches!(err, DiskError::SizeNotSectorMultiple { size: 1000, .. }));
    ///
    /// std::fs::write(&path, [0u8; 1024])?;
    /// let mut disk = DiskImage::open(&path, DiskMode::ReadOnly)?;
    /// assert!(disk.is_read_only());
    /// assert!(matches!(disk.write_at(0, b"x"), Err(DiskError::ReadOnly)));
    /// # drop(disk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>, mode: DiskMode) -> Result<Self, DiskError> {
        let path = path.as_ref().to_path_buf();
        let writable = mode.writes_base();
        let (base, meta, size) = open_base(&path, writable)?;
        let backend = match &mode {
            DiskMode::ReadWrite => Backend::Raw {
                file: base,
                writable: true,
                punch: true,
            },
            DiskMode::ReadOnly => Backend::Raw {
                file: base,
                writable: false,
                punch: false,
            },
            DiskMode::Overlay(OverlayTarget::Memory) => Backend::Overlay(Overlay {
                base,
                present: BlockBitmap::new(size)?,
                store: Store::Memory(HashMap::new()),
            }),
            DiskMode::Overlay(OverlayTarget::File {
                path: overlay,
                keep,
                if_exists,
            }) => Backend::Overlay(Overlay::open_file(
                base, &path, &meta, size, overlay, *keep, *if_exists,
            )?),
        };
        Ok(DiskImage {
            path,
            mode,
            size,
            id: [0; DISK_ID_LEN],
            backend,
        })
    }

    /// Sets the identification string the guest sees as the disk's serial: at most
    /// [`DISK_ID_LEN`] printable ASCII characters without spaces.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::{Disk, DiskImage, DiskMode, OverlayTarget};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-id-{}.img", std::process::id()));
    /// # std::fs::write(&path, [0u8; 512])?;
    /// let disk = DiskImage::open(&path, DiskMode::Overlay(OverlayTarget::Memory))?
    ///     .with_id("sandbox-42-root")?;
    /// assert_eq!(&disk.id()[..15], b"sandbox-42-root");
    /// assert_eq!(disk.id()[15..], [0; 5]);
    /// # let disk2 = DiskImage::open(&path, DiskMode::ReadOnly)?;
    /// # assert!(disk2.with_id("has space").is_err());
    /// # drop(disk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_id(mut self, id: &str) -> Result<Self, DiskError> {
        if id.len() > DISK_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(DiskError::InvalidId { id: id.to_string() });
        }
        self.id = [0; DISK_ID_LEN];
        self.id[..id.len()].copy_from_slice(id.as_bytes());
        Ok(self)
    }

    /// The image path the disk was opened with.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::{DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-path-{}.img", std::process::id()));
    /// # std::fs::write(&path, [0u8; 512])?;
    /// let disk = DiskImage::open(&path, DiskMode::ReadOnly)?;
    /// assert_eq!(disk.path(), path);
    /// # drop(disk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mode the disk was opened in.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::{DiskImage, DiskMode};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-mode-{}.img", std::process::id()));
    /// # std::fs::write(&path, [0u8; 512])?;
    /// let disk = DiskImage::open(&path, DiskMode::ReadOnly)?;
    /// assert_eq!(disk.mode(), &DiskMode::ReadOnly);
    /// # drop(disk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn mode(&self) -> &DiskMode {
        &self.mode
    }

    /// How many [`OVERLAY_BLOCK_SIZE`] blocks the overlay holds (written, discarded or
    /// zeroed by the VM); `None` without an overlay.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::block::disk::{Disk, DiskImage, DiskMode, OverlayTarget};
    /// # let path = std::env::temp_dir().join(format!("smolvm-doc-blocks-{}.img", std::process::id()));
    /// # std::fs::write(&path, [0u8; 16384])?;
    /// let mut disk = DiskImage::open(&path, DiskMode::Overlay(OverlayTarget::Memory))?;
    /// disk.write_at(4000, &[1; 200])?; // straddles blocks 0 and 1
    /// assert_eq!(disk.overlay_blocks(), Some(2));
    /// # drop(disk);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn overlay_blocks(&self) -> Option<u64> {
        match &self.backend {
            Backend::Raw { .. } => None,
            Backend::Overlay(o) => Some(o.present.count()),
        }
    }

    /// Rejects mutating requests on read-only disks, then checks the range.
    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if let Backend::Raw {
            writable: false, ..
        } = self.backend
        {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// Discard and write-zeroes (the same thing here).
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        match &mut self.backend {
            Backend::Raw { file, punch, .. } => zero_file_range(file, offset, len, punch)?,
            Backend::Overlay(o) => o.zero(offset, len, self.size)?,
        }
        Ok(())
    }
}

impl Disk for DiskImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        matches!(
            self.backend,
            Backend::Raw {
                writable: false,
                ..
            }
        )
    }

    fn id(&self) -> [u8; DISK_ID_LEN] {
        self.id
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        match &self.backend {
            Backend::Raw { file, .. } => file.read_exact_at(buf, offset)?,
            Backend::Overlay(o) => o.read(offset, buf)?,
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_write(offset, data.len() as u64)?;
        match &mut self.backend {
            Backend::Raw { file, .. } => file.write_all_at(data, offset)?,
            Backend::Overlay(o) => o.write(offset, data, self.size)?,
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        match &mut self.backend {
            Backend::Raw {
                file,
                writable: true,
                ..
            } => file.sync_data()?,
            Backend::Raw {
                writable: false, ..
            } => {}
            Backend::Overlay(o) => o.flush()?,
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero(offset, len)
    }
}

impl fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("size", &self.size)
            .field(
                "id",
                &String::from_utf8_lossy(&self.id).trim_end_matches('\0'),
            )
            .field("overlay_blocks", &self.overlay_blocks())
            .finish()
    }
}

/// Opens and locks the base image; returns it with its metadata and size in bytes.
fn open_base(path: &Path, writable: bool) -> Result<(File, fs::Metadata, u64), DiskError> {
    let access = if writable {
        "reading and writing"
    } else {
        "reading"
    };
    let map_err = |e: io::Error| -> DiskError {
        match e.kind() {
            io::ErrorKind::NotFound => DiskError::NotFound {
                path: path.to_path_buf(),
            },
            io::ErrorKind::PermissionDenied => DiskError::PermissionDenied {
                path: path.to_path_buf(),
                access,
            },
            _ if e.raw_os_error() == Some(libc::EROFS) => DiskError::ReadOnlyFileSystem {
                path: path.to_path_buf(),
            },
            _ if e.raw_os_error() == Some(libc::EISDIR) => DiskError::NotADiskImage {
                path: path.to_path_buf(),
                what: "a directory",
            },
            _ => DiskError::Open {
                path: path.to_path_buf(),
                source: e,
            },
        }
    };
    // Look before opening: opening a FIFO would block until someone writes to it.
    check_file_type(path, &fs::metadata(path).map_err(map_err)?)?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(map_err)?;
    let meta = file.metadata().map_err(map_err)?;
    check_file_type(path, &meta)?;

    match flock(&file, writable) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let path = path.to_path_buf();
            return Err(if writable {
                DiskError::LockedByOthers { path }
            } else {
                DiskError::LockedByWriter { path }
            });
        }
        Err(source) => {
            return Err(DiskError::Lock {
                path: path.to_path_buf(),
                source,
            })
        }
    }

    let size = if meta.file_type().is_block_device() {
        (&file).seek(SeekFrom::End(0)).map_err(map_err)?
    } else {
        meta.len()
    };
    if size == 0 {
        return Err(DiskError::Empty {
            path: path.to_path_buf(),
        });
    }
    if size % SECTOR_SIZE != 0 {
        return Err(DiskError::SizeNotSectorMultiple {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok((file, meta, size))
}

/// Accepts regular files and block devices.
fn check_file_type(path: &Path, meta: &fs::Metadata) -> Result<(), DiskError> {
    let t = meta.file_type();
    let what = if t.is_file() || t.is_block_device() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(DiskError::NotADiskImage {
        path: path.to_path_buf(),
        what,
    })
}

/// `flock(LOCK_EX | LOCK_NB)` or `flock(LOCK_SH | LOCK_NB)`; a conflict is `WouldBlock`.
fn flock(file: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock only takes a descriptor and flags; `file` owns the descriptor and
        // keeps it open for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes `offset..offset + len` of `file` read as zeroes: punches a hole while `*punch` says
/// the file system can, and writes zeroes otherwise (clearing `*punch` on the first refusal).
fn zero_file_range(file: &File, offset: u64, len: u64, punch: &mut bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if *punch {
        match punch_hole(file, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if punch_unsupported(&e) => *punch = false,
            Err(e) => return Err(e),
        }
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64);
        file.write_all_at(&ZEROES[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Whether a hole-punching error means "not supported here" (so zeroes should be written).
fn punch_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        // ENOTSUP and EOPNOTSUPP are one value on Linux, two on macOS.
        || e.raw_os_error().is_some_and(|c| {
            c == libc::EOPNOTSUPP || c == libc::ENOTSUP || c == libc::ENOSYS
        })
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: frees the range, keeps the size.
#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let off = libc::off_t::try_from(offset).map_err(invalid)?;
    let len = libc::off_t::try_from(len).map_err(invalid)?;
    loop {
        // SAFETY: fallocate only takes a descriptor and integers; `file` owns the descriptor
        // and keeps it open for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// No portable hole punching outside Linux: callers write zeroes instead.
#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// One bit per [`OVERLAY_BLOCK_SIZE`] block of the disk: set = the block is in the overlay.
struct BlockBitmap {
    words: Vec<u64>,
    blocks: u64,
}

impl BlockBitmap {
    /// An empty bitmap for a disk of `size` bytes.
    fn new(size: u64) -> io::Result<Self> {
        let blocks = size.div_ceil(OVERLAY_BLOCK_SIZE);
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "disk too large"))?;
        Ok(BlockBitmap {
            words: vec![0; words],
            blocks,
        })
    }

    fn get(&self, block: u64) -> bool {
        self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Sets bit `block`; returns whether it was clear.
    fn set(&mut self, block: u64) -> bool {
        let word = &mut self.words[(block / 64) as usize];
        let bit = 1 << (block % 64);
        let was_clear = *word & bit == 0;
        *word |= bit;
        was_clear
    }

    /// Sets bits `start..end`; returns whether any was clear.
    fn set_range(&mut self, start: u64, end: u64) -> bool {
        let mut changed = false;
        let mut b = start;
        while b < end {
            let shift = b % 64;
            let n = (64 - shift).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << shift
            };
            let word = &mut self.words[(b / 64) as usize];
            changed |= *word & mask != mask;
            *word |= mask;
            b += n;
        }
        changed
    }

    /// The first block in `start + 1..end` whose bit differs from `start`'s, or `end`.
    fn run_end(&self, start: u64, end: u64) -> u64 {
        let set = self.get(start);
        let mut b = start + 1;
        while b < end {
            let word = self.words[(b / 64) as usize];
            let differing = if set { !word } else { word } >> (b % 64);
            if differing != 0 {
                return end.min(b + u64::from(differing.trailing_zeros()));
            }
            b = (b / 64 + 1) * 64;
        }
        end
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Length of the serialized bitmap in bytes.
    fn byte_len(&self) -> usize {
        self.blocks.div_ceil(8) as usize
    }

    /// Reads a serialized bitmap (`bytes.len() == byte_len()`).
    fn load(&mut self, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.words[i] = u64::from_le_bytes(word);
        }
        // Bits past the last block carry nothing; keep them clear so count() is exact.
        if self.blocks % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1 << (self.blocks % 64)) - 1;
            }
        }
    }

    /// Writes the serialized bitmap: `byte_len()` bytes.
    fn save(&self, out: &mut impl Write) -> io::Result<()> {
        let mut left = self.byte_len();
        for word in &self.words {
            let n = left.min(8);
            out.write_all(&word.to_le_bytes()[..n])?;
            left -= n;
        }
        Ok(())
    }
}

/// What identifies the base image's version in a block map.
#[derive(Clone, Copy, PartialEq, Eq)]
struct BaseStamp {
    size: u64,
    mtime_sec: i64,
    mtime_nsec: u32,
}

impl BaseStamp {
    fn of(size: u64, meta: &fs::Metadata) -> Self {
        // st_mtime_nsec is always in 0..1_000_000_000.
        let mtime_nsec = u32::try_from(meta.mtime_nsec()).unwrap_or(0);
        BaseStamp {
            size,
            mtime_sec: meta.mtime(),
            mtime_nsec,
        }
    }
}

/// Where an overlay keeps its blocks.
enum Store {
    /// Blocks written with data; blocks in the bitmap but not here are zero.
    Memory(HashMap<u64, Box<[u8; BLOCK]>>),
    File(OverlayFile),
}

/// A sparse overlay file, block `i` at offset `i * OVERLAY_BLOCK_SIZE`.
struct OverlayFile {
    file: File,
    /// Cleared after the file system said it cannot punch holes.
    punch: bool,
    /// Present only with `keep: true`.
    map: Option<MapFile>,
}

/// The sidecar block map of a kept overlay.
struct MapFile {
    path: PathBuf,
    stamp: BaseStamp,
    /// The bitmap gained blocks since it was last saved.
    dirty: bool,
}

/// Copy-on-write state over a read-only base.
struct Overlay {
    base: File,
    present: BlockBitmap,
    store: Store,
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether `path` exists and is the same file as `meta` (same device and inode).
fn same_file(path: &Path, meta: &fs::Metadata) -> bool {
    fs::metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
}

/// Removes `path`, treating "not there" as done.
fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Overlay {
    /// Creates or reopens an overlay file for `base` (`size` bytes, metadata `base_meta`).
    #[allow(clippy::too_many_arguments)]
    fn open_file(
        base: File,
        base_path: &Path,
        base_meta: &fs::Metadata,
        size: u64,
        path: &Path,
        keep: bool,
        if_exists: IfOverlayExists,
    ) -> Result<Self, DiskError> {
        let map_path = with_suffix(path, ".map");
        for p in [path, &map_path] {
            if same_file(p, base_meta) {
                return Err(DiskError::OverlayIsBase {
                    path: p.to_path_buf(),
                });
            }
        }
        let overlay_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DiskError::Overlay { path: p, source }
        };
        let create = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
        };
        let (file, fresh) = match if_exists {
            IfOverlayExists::Refuse => {
                if keep && fs::symlink_metadata(&map_path).is_ok() {
                    return Err(DiskError::OverlayExists { path: map_path });
                }
                match create() {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(DiskError::OverlayExists {
                            path: path.to_path_buf(),
                        });
                    }
                    r => (r.map_err(overlay_err(path))?, true),
                }
            }
            IfOverlayExists::Replace => {
                remove_if_exists(path).map_err(overlay_err(path))?;
                remove_if_exists(&map_path).map_err(overlay_err(&map_path))?;
                match create() {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Err(DiskError::OverlayExists {
                            path: path.to_path_buf(),
                        });
                    }
                    r => (r.map_err(overlay_err(path))?, true),
                }
            }
            IfOverlayExists::Reuse => match OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => (f, false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    (create().map_err(overlay_err(path))?, true)
                }
                Err(e) => return Err(overlay_err(path)(e)),
            },
        };
        match flock(&file, true) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(DiskError::OverlayInUse {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(DiskError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let stamp = BaseStamp::of(size, base_meta);
        let mut present = BlockBitmap::new(size)?;
        if fresh {
            file.set_len(size).map_err(overlay_err(path))?;
        } else {
            let meta = file.metadata().map_err(overlay_err(path))?;
            if !meta.is_file() {
                return Err(DiskError::OverlayInvalid {
                    path: path.to_path_buf(),
                    reason: "it is not a regular file",
                });
            }
            load_map(&map_path, path, base_path, stamp, &mut present)?;
            if meta.len() != size {
                return Err(DiskError::OverlayInvalid {
                    path: path.to_path_buf(),
                    reason: "the overlay file's size differs from the base image's",
                });
            }
        }
        let map = if keep {
            let map = MapFile {
                path: map_path,
                stamp,
                dirty: false,
            };
            if fresh {
                map.save(&present).map_err(overlay_err(&map.path))?;
            }
            Some(map)
        } else {
            // Gone from the directory now; the open descriptor keeps the data until drop.
            remove_if_exists(path).map_err(overlay_err(path))?;
            if !fresh {
                // The map of the overlay just taken over; a fresh overlay never had one.
                remove_if_exists(&map_path).map_err(overlay_err(&map_path))?;
            }
            None
        };
        Ok(Overlay {
            base,
            present,
            store: Store::File(OverlayFile {
                file,
                punch: true,
                map,
            }),
        })
    }

    /// Reads `buf.len()` bytes at `offset` (range already checked), one `pread` per run of
    /// blocks that are all in the overlay or all in the base.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let end_block = end.div_ceil(OVERLAY_BLOCK_SIZE);
        let mut off = offset;
        while off < end {
            let block = off / OVERLAY_BLOCK_SIZE;
            let run_end = end.min(self.present.run_end(block, end_block) * OVERLAY_BLOCK_SIZE);
            let chunk = &mut buf[(off - offset) as usize..(run_end - offset) as usize];
            if !self.present.get(block) {
                self.base.read_exact_at(chunk, off)?;
            } else {
                match &self.store {
                    Store::File(f) => f.file.read_exact_at(chunk, off)?,
                    Store::Memory(blocks) => {
                        let mut done = 0;
                        while done < chunk.len() {
                            let at = off + done as u64;
                            let within = (at % OVERLAY_BLOCK_SIZE) as usize;
                            let n = (BLOCK - within).min(chunk.len() - done);
                            let dst = &mut chunk[done..done + n];
                            match blocks.get(&(at / OVERLAY_BLOCK_SIZE)) {
                                Some(data) => dst.copy_from_slice(&data[within..within + n]),
                                None => dst.fill(0),
                            }
                            done += n;
                        }
                    }
                }
            }
            off = run_end;
        }
        Ok(())
    }

    /// Bytes in block `block` of a disk of `size` bytes (the last one may be short).
    fn block_len(block: u64, size: u64) -> usize {
        (size - block * OVERLAY_BLOCK_SIZE).min(OVERLAY_BLOCK_SIZE) as usize
    }

    /// Splits `offset..offset + len` (checked) into runs of whole blocks (`f(offset, len,
    /// true)`) and partial blocks (`f(offset, len, false)`, never crossing a block boundary).
    fn for_each_piece(
        offset: u64,
        len: u64,
        size: u64,
        mut f: impl FnMut(u64, u64, bool) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let block = off / OVERLAY_BLOCK_SIZE;
            let within = off % OVERLAY_BLOCK_SIZE;
            let block_len = Self::block_len(block, size) as u64;
            if within == 0 && end - off >= block_len {
                // Whole blocks up to the last block boundary, or to the end of the disk.
                let run_end = if end == size {
                    size
                } else {
                    end / OVERLAY_BLOCK_SIZE * OVERLAY_BLOCK_SIZE
                };
                f(off, run_end - off, true)?;
                off = run_end;
            } else {
                let n = (block_len - within).min(end - off);
                f(off, n, false)?;
                off += n;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` (range checked) into the overlay.
    fn write(&mut self, offset: u64, data: &[u8], size: u64) -> io::Result<()> {
        Self::for_each_piece(offset, data.len() as u64, size, |off, len, whole| {
            let piece = &data[(off - offset) as usize..(off - offset + len) as usize];
            if whole {
                self.write_blocks(off, piece)
            } else {
                self.write_partial(off, piece, size)
            }
        })
    }

    /// Makes `offset..offset + len` (checked) read as zeroes in the overlay.
    fn zero(&mut self, offset: u64, len: u64, size: u64) -> io::Result<()> {
        Self::for_each_piece(offset, len, size, |off, len, whole| {
            if !whole {
                return self.write_partial(off, &ZEROES[..len as usize], size);
            }
            let (first, end) = (
                off / OVERLAY_BLOCK_SIZE,
                (off + len).div_ceil(OVERLAY_BLOCK_SIZE),
            );
            match &mut self.store {
                Store::File(f) => zero_file_range(&f.file, off, len, &mut f.punch)?,
                Store::Memory(blocks) => {
                    if (blocks.len() as u64) < end - first {
                        blocks.retain(|b, _| !(first..end).contains(b));
                    } else {
                        for b in first..end {
                            blocks.remove(&b);
                        }
                    }
                }
            }
            self.mark(first, end);
            Ok(())
        })
    }

    /// Writes whole blocks: `offset` is block-aligned, `data` ends on a block boundary or at
    /// the end of the disk.
    fn write_blocks(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let first = offset / OVERLAY_BLOCK_SIZE;
        match &mut self.store {
            Store::File(f) => f.file.write_all_at(data, offset)?,
            Store::Memory(blocks) => {
                for (i, chunk) in data.chunks(BLOCK).enumerate() {
                    let block = blocks.entry(first + i as u64).or_insert_with(zeroed_block);
                    block[..chunk.len()].copy_from_slice(chunk);
                }
            }
        }
        self.mark(
            first,
            (offset + data.len() as u64).div_ceil(OVERLAY_BLOCK_SIZE),
        );
        Ok(())
    }

    /// Writes `data` inside one block, copying the block up from the base first if needed.
    fn write_partial(&mut self, offset: u64, data: &[u8], size: u64) -> io::Result<()> {
        let block = offset / OVERLAY_BLOCK_SIZE;
        let within = (offset % OVERLAY_BLOCK_SIZE) as usize;
        if self.present.get(block) {
            match &mut self.store {
                Store::File(f) => f.file.write_all_at(data, offset)?,
                Store::Memory(blocks) => {
                    let b = blocks.entry(block).or_insert_with(zeroed_block);
                    b[within..within + data.len()].copy_from_slice(data);
                }
            }
            return Ok(());
        }
        let start = block * OVERLAY_BLOCK_SIZE;
        let len = Self::block_len(block, size);
        let mut copy = [0u8; BLOCK];
        self.base.read_exact_at(&mut copy[..len], start)?;
        copy[within..within + data.len()].copy_from_slice(data);
        match &mut self.store {
            Store::File(f) => f.file.write_all_at(&copy[..len], start)?,
            Store::Memory(blocks) => {
                blocks.insert(block, Box::new(copy));
            }
        }
        self.mark(block, block + 1);
        Ok(())
    }

    /// Records blocks `first..end` as in the overlay.
    fn mark(&mut self, first: u64, end: u64) {
        let changed = if end == first + 1 {
            self.present.set(first)
        } else {
            self.present.set_range(first, end)
        };
        if changed {
            if let Store::File(OverlayFile { map: Some(map), .. }) = &mut self.store {
                map.dirty = true;
            }
        }
    }

    /// Syncs a kept overlay file, then saves its block map if it gained blocks.
    fn flush(&mut self) -> io::Result<()> {
        if let Store::File(OverlayFile {
            file,
            map: Some(map),
            ..
        }) = &mut self.store
        {
            file.sync_data()?;
            if map.dirty {
                map.save(&self.present)?;
                map.dirty = false;
            }
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            if let Store::File(OverlayFile { map: Some(map), .. }) = &self.store {
                log::warn!(
                    "could not save overlay block map {}: {e}; writes since the last flush are lost",
                    map.path.display()
                );
            }
        }
    }
}

/// A zero-filled overlay block.
fn zeroed_block() -> Box<[u8; BLOCK]> {
    Box::new([0; BLOCK])
}

impl MapFile {
    /// Saves `present` atomically: `<map>.tmp`, fsync, rename over the map, fsync the directory.
    fn save(&self, present: &BlockBitmap) -> io::Result<()> {
        let tmp = with_suffix(&self.path, ".tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = BufWriter::new(file);
        out.write_all(MAP_MAGIC)?;
        out.write_all(&MAP_VERSION.to_le_bytes())?;
        out.write_all(&(BLOCK as u32).to_le_bytes())?;
        out.write_all(&self.stamp.size.to_le_bytes())?;
        out.write_all(&self.stamp.mtime_sec.to_le_bytes())?;
        out.write_all(&self.stamp.mtime_nsec.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&present.blocks.to_le_bytes())?;
        present.save(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &self.path)?;
        // Make the rename durable; not every file system lets a directory be synced.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Reads the block map of a reused overlay into `present`, checking it against the base.
fn load_map(
    map_path: &Path,
    overlay_path: &Path,
    base_path: &Path,
    stamp: BaseStamp,
    present: &mut BlockBitmap,
) -> Result<(), DiskError> {
    let bytes = match fs::read(map_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::OverlayMapMissing {
                path: overlay_path.to_path_buf(),
                map: map_path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(DiskError::Overlay {
                path: map_path.to_path_buf(),
                source,
            })
        }
    };
    let invalid = |reason| DiskError::OverlayInvalid {
        path: map_path.to_path_buf(),
        reason,
    };
    if bytes.len() < MAP_HEADER_LEN || &bytes[..8] != MAP_MAGIC {
        return Err(invalid("its block map is not a smolvm overlay map"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    if u32_at(8) != MAP_VERSION {
        return Err(invalid("its block map has an unknown version"));
    }
    if u32_at(12) != BLOCK as u32 {
        return Err(invalid("its block map uses a different block size"));
    }
    let base_changed = |what| DiskError::OverlayBaseChanged {
        path: overlay_path.to_path_buf(),
        base: base_path.to_path_buf(),
        what,
    };
    if u64_at(16) != stamp.size {
        return Err(base_changed("size"));
    }
    if u64_at(24) as i64 != stamp.mtime_sec || u32_at(32) != stamp.mtime_nsec {
        return Err(base_changed("modification time"));
    }
    if u64_at(40) != present.blocks || bytes.len() != MAP_HEADER_LEN + present.byte_len() {
        return Err(invalid(
            "its block map is truncated or does not match the disk size",
        ));
    }
    present.load(&bytes[MAP_HEADER_LEN..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique path under the temp directory; removes it, its `.map` and `.map.tmp` on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let file = format!("smolvm-disk-test-{}-{n}-{name}", std::process::id());
            let p = TempPath(std::env::temp_dir().join(file));
            p.cleanup();
            p
        }
        fn map(&self) -> PathBuf {
            with_suffix(&self.0, ".map")
        }
        fn cleanup(&self) {
            let _ = fs::remove_file(&self.0);
            let _ = fs::remove_file(self.map());
            let _ = fs::remove_file(with_suffix(&self.map(), ".tmp"));
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            self.cleanup();
        }
    }

    impl std::ops::Deref for TempPath {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    /// Non-repeating-looking base content: byte `i` of the image.
    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(31) ^ (i >> 12).wrapping_mul(101)) as u8 | 1
    }

    fn make_base(name: &str, size: u64) -> (TempPath, Vec<u8>) {
        let p = TempPath::new(name);
        let data: Vec<u8> = (0..size).map(pattern).collect();
        fs::write(&*p, &data).unwrap();
        (p, data)
    }

    /// FNV-1a of the file's bytes.
    fn checksum(path: &Path) -> u64 {
        fs::read(path)
            .unwrap()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
    }

    fn read_all(disk: &dyn Disk) -> Vec<u8> {
        let mut buf = vec![0; disk.size() as usize];
        disk.read_at(0, &mut buf).unwrap();
        buf
    }

    fn memory() -> DiskMode {
        DiskMode::Overlay(OverlayTarget::Memory)
    }

    /// A disk and the bytes it must read back.
    struct Checked<'a> {
        disk: &'a mut DiskImage,
        model: Vec<u8>,
    }

    impl Checked<'_> {
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.disk.write_at(offset, data).unwrap();
            self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn zero(&mut self, offset: u64, len: u64, discard: bool) {
            if discard {
                self.disk.discard(offset, len).unwrap();
            } else {
                self.disk.write_zeroes(offset, len).unwrap();
            }
            self.model[offset as usize..(offset + len) as usize].fill(0);
        }
        fn verify(&self) {
            assert!(
                read_all(self.disk) == self.model,
                "disk content differs from the model"
            );
            // Unaligned reads across block boundaries, too.
            for &(off, len) in &[(1u64, 4095usize), (4000, 200), (4095, 8194), (511, 1)] {
                if off + len as u64 <= self.disk.size() {
                    let mut buf = vec![0; len];
                    self.disk.read_at(off, &mut buf).unwrap();
                    assert_eq!(
                        buf,
                        self.model[off as usize..off as usize + len],
                        "at {off}"
                    );
                }
            }
        }
    }

    /// Writes, partial writes, discards and write-zeroes of every shape, checked against a
    /// model after each step.
    fn exercise(disk: &mut DiskImage, initial: Vec<u8>) -> Vec<u8> {
        let size = disk.size();
        let mut c = Checked {
            disk,
            model: initial,
        };
        c.verify();
        c.write(0, &[0xaa; 4096]); // one whole block
        c.verify();
        c.write(4096 + 100, &[0xbb; 10]); // partial: neighbours must come from the base
        c.verify();
        c.write(3 * 4096 - 7, &[0xcc; 4096 * 2 + 14]); // partial, whole, partial
        c.verify();
        c.write(4096 + 200, &[0xdd; 3]); // partial into a block already copied up
        c.verify();
        c.zero(8 * 4096, 3 * 4096, true); // whole blocks never written: must not show base
        c.verify();
        c.zero(12 * 4096 + 10, 100, false); // partial zeroing
        c.verify();
        c.zero(3 * 4096 + 1, 4096 * 2, false); // straddling, over written blocks
        c.verify();
        c.write(9 * 4096 + 5, &[0xee; 5]); // partial write into a zeroed block
        c.verify();
        c.write(size - 512, &[0x11; 512]); // last sector
        c.zero(size - 4096 * 2, 100, true);
        c.verify();
        c.model
    }

    #[test]
    fn read_write_round_trip_persists() {
        let (base, initial) = make_base("rw.img", 64 * 1024);
        let mut disk = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap();
        assert!(!disk.is_read_only());
        assert_eq!(disk.size(), 64 * 1024);
        assert_eq!(disk.sectors(), 128);
        assert_eq!(disk.overlay_blocks(), None);
        let model = exercise(&mut disk, initial);
        disk.flush().unwrap();
        drop(disk);
        assert!(fs::read(&*base).unwrap() == model);
        let disk = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap();
        assert!(read_all(&disk) == model);
    }

    #[test]
    fn read_only_rejects_writes_and_flushes() {
        let (base, initial) = make_base("ro.img", 16 * 1024);
        let sum = checksum(&base);
        let mut disk = DiskImage::open(&*base, DiskMode::ReadOnly).unwrap();
        assert!(disk.is_read_only());
        assert!(matches!(disk.write_at(0, b"x"), Err(DiskError::ReadOnly)));
        assert!(matches!(disk.write_at(0, &[]), Err(DiskError::ReadOnly)));
        assert!(matches!(disk.discard(0, 4096), Err(DiskError::ReadOnly)));
        assert!(matches!(
            disk.write_zeroes(0, 512),
            Err(DiskError::ReadOnly)
        ));
        // Read-only wins over out-of-range: the device reports the more useful error.
        assert!(matches!(
            disk.write_at(u64::MAX, b"x"),
            Err(DiskError::ReadOnly)
        ));
        disk.flush().unwrap();
        assert!(read_all(&disk) == initial);
        drop(disk);
        assert_eq!(checksum(&base), sum);
    }

    #[test]
    fn read_only_base_file_permissions_are_enough() {
        // The base is opened O_RDONLY in read-only and overlay modes: a 0444 image works.
        let (base, initial) = make_base("ro-perm.img", 8192);
        fs::set_permissions(&*base, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        let mut disk = DiskImage::open(&*base, memory()).unwrap();
        disk.write_at(0, &[9; 8192]).unwrap();
        drop(disk);
        assert!(fs::read(&*base).unwrap() == initial);
    }

    #[test]
    fn memory_overlay_leaves_base_untouched() {
        let (base, initial) = make_base("mem.img", 64 * 1024);
        let sum = checksum(&base);
        let mut disk = DiskImage::open(&*base, memory()).unwrap();
        assert!(!disk.is_read_only());
        exercise(&mut disk, initial.clone());
        disk.flush().unwrap();
        assert!(disk.overlay_blocks().unwrap() > 0);
        drop(disk);
        assert_eq!(checksum(&base), sum);
        // A new memory overlay starts from the base again.
        let disk = DiskImage::open(&*base, memory()).unwrap();
        assert!(read_all(&disk) == initial);
    }

    #[test]
    fn file_overlay_leaves_base_untouched() {
        let (base, initial) = make_base("file.img", 64 * 1024);
        let overlay = TempPath::new("file.overlay");
        let sum = checksum(&base);
        let mode = DiskMode::Overlay(OverlayTarget::File {
            path: overlay.to_path_buf(),
            keep: true,
            if_exists: IfOverlayExists::Refuse,
        });
        let mut disk = DiskImage::open(&*base, mode).unwrap();
        exercise(&mut disk, initial);
        disk.flush().unwrap();
        assert_eq!(checksum(&base), sum);
        // The overlay is a sparse file of the base's size.
        assert_eq!(fs::metadata(&*overlay).unwrap().len(), 64 * 1024);
        assert_eq!(fs::metadata(&*overlay).unwrap().mode() & 0o777, 0o600);
        drop(disk);
        assert_eq!(checksum(&base), sum);
    }

    #[test]
    fn disk_size_not_a_multiple_of_the_block_size() {
        // 3.5 blocks: the last overlay block is short.
        let size = 3 * 4096 + 2048;
        let (base, initial) = make_base("short.img", size);
        let overlay = TempPath::new("short.overlay");
        for mode in [
            memory(),
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        ] {
            let mut disk = DiskImage::open(&*base, mode).unwrap();
            let mut c = Checked {
                disk: &mut disk,
                model: initial.clone(),
            };
            c.write(3 * 4096 + 100, &[1; 200]); // partial in the short block
            c.verify();
            c.write(2 * 4096, &[2; 4096 + 2048]); // whole blocks up to the end of the disk
            c.verify();
            c.zero(3 * 4096, 2048, true);
            c.verify();
            c.write(size - 1, &[3]);
            c.verify();
            assert_eq!(disk.overlay_blocks(), Some(2));
        }
        assert!(fs::read(&*base).unwrap() == initial);
    }

    #[test]
    fn partial_block_write_keeps_neighbouring_base_bytes() {
        let (base, initial) = make_base("partial.img", 16 * 1024);
        let overlay = TempPath::new("partial.overlay");
        for mode in [
            memory(),
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        ] {
            let mut disk = DiskImage::open(&*base, mode).unwrap();
            disk.write_at(4096 + 512, &[0; 512]).unwrap();
            assert_eq!(disk.overlay_blocks(), Some(1));
            let mut block = vec![0; 4096];
            disk.read_at(4096, &mut block).unwrap();
            assert_eq!(block[..512], initial[4096..4096 + 512]);
            assert_eq!(block[512..1024], [0; 512]);
            assert_eq!(block[1024..], initial[4096 + 1024..8192]);
        }
    }

    #[test]
    fn zeroed_blocks_never_show_base_bytes() {
        let (base, _) = make_base("zeroed.img", 16 * 1024);
        let overlay = TempPath::new("zeroed.overlay");
        for mode in [
            memory(),
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        ] {
            let mut disk = DiskImage::open(&*base, mode).unwrap();
            disk.write_at(0, &[5; 16384]).unwrap();
            disk.discard(0, 8192).unwrap();
            disk.write_zeroes(8192, 8192).unwrap();
            assert!(read_all(&disk).iter().all(|&b| b == 0));
            // Zeroing never-written blocks also hides the base.
            let mut fresh = DiskImage::open(&*base, memory()).unwrap();
            fresh.discard(0, 16384).unwrap();
            assert!(read_all(&fresh).iter().all(|&b| b == 0));
            assert_eq!(fresh.overlay_blocks(), Some(4));
        }
    }

    /// Allocated bytes of the file (`st_blocks` counts 512-byte units).
    fn allocated(path: &Path) -> u64 {
        fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn write_zeroes_punches_holes_in_read_write_mode() {
        let size = 1 << 20;
        let p = TempPath::new("punch.img");
        fs::write(&*p, vec![0x5a; size as usize]).unwrap();
        let mut disk = DiskImage::open(&*p, DiskMode::ReadWrite).unwrap();
        disk.flush().unwrap();
        let before = allocated(&p);
        disk.write_zeroes(0, size / 2).unwrap();
        disk.discard(size / 2 + 4096, 64 * 1024).unwrap();
        disk.write_zeroes(size - 100, 100).unwrap(); // unaligned tail: zeroed, not freed
        disk.flush().unwrap();
        let mut expected = vec![0x5a; size as usize];
        expected[..size as usize / 2].fill(0);
        expected[(size / 2 + 4096) as usize..(size / 2 + 4096 + 65536) as usize].fill(0);
        expected[size as usize - 100..].fill(0);
        assert!(read_all(&disk) == expected);
        assert_eq!(fs::metadata(&*p).unwrap().len(), size, "the size is kept");
        let after = allocated(&p);
        let Backend::Raw { punch, .. } = disk.backend else {
            unreachable!()
        };
        if punch {
            assert!(
                after + size / 2 <= before,
                "holes were punched but only {} of {} bytes freed",
                before - after,
                size / 2 + 65536
            );
        } else {
            println!("note: the temp file system cannot punch holes; zeroes were written instead");
        }
    }

    #[test]
    fn overlay_file_discard_punches_holes() {
        let (base, _) = make_base("ovpunch.img", 1 << 20);
        let overlay = TempPath::new("ovpunch.overlay");
        let mode = DiskMode::Overlay(OverlayTarget::File {
            path: overlay.to_path_buf(),
            keep: true,
            if_exists: IfOverlayExists::Refuse,
        });
        let mut disk = DiskImage::open(&*base, mode).unwrap();
        disk.write_at(0, &vec![1; 1 << 20]).unwrap();
        disk.flush().unwrap();
        let before = allocated(&overlay);
        disk.discard(0, 1 << 19).unwrap();
        disk.flush().unwrap();
        let Backend::Overlay(Overlay {
            store: Store::File(f),
            ..
        }) = &disk.backend
        else {
            unreachable!()
        };
        if f.punch {
            assert!(allocated(&overlay) + (1 << 19) <= before);
        } else {
            println!("note: the temp file system cannot punch holes; zeroes were written instead");
        }
        assert!(read_all(&disk)[..1 << 19].iter().all(|&b| b == 0));
    }

    #[test]
    fn two_overlays_on_one_base_are_independent() {
        let (base, initial) = make_base("two.img", 32 * 1024);
        let overlay = TempPath::new("two.overlay");
        let sum = checksum(&base);
        let mut a = DiskImage::open(&*base, memory()).unwrap();
        let mut b = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        )
        .unwrap();
        let mut c = DiskImage::open(&*base, memory()).unwrap();
        let ro = DiskImage::open(&*base, DiskMode::ReadOnly).unwrap();
        a.write_at(0, &[0xa; 6000]).unwrap();
        b.write_at(2000, &[0xb; 6000]).unwrap();
        c.discard(4096, 4096).unwrap();
        let (ra, rb, rc) = (read_all(&a), read_all(&b), read_all(&c));
        let mut ea = initial.clone();
        ea[..6000].fill(0xa);
        let mut eb = initial.clone();
        eb[2000..8000].fill(0xb);
        let mut ec = initial.clone();
        ec[4096..8192].fill(0);
        assert!(ra == ea && rb == eb && rc == ec);
        assert!(read_all(&ro) == initial);
        drop((a, b, c, ro));
        assert_eq!(checksum(&base), sum);
    }

    #[test]
    fn scratch_overlay_file_disappears() {
        let (base, initial) = make_base("scratch.img", 16 * 1024);
        let overlay = TempPath::new("scratch.overlay");
        let mut disk = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        )
        .unwrap();
        // Unlinked as soon as it is open: gone even if the process crashed now.
        assert!(!overlay.exists());
        disk.write_at(0, &[1; 16384]).unwrap();
        disk.flush().unwrap();
        assert!(read_all(&disk).iter().all(|&b| b == 1));
        drop(disk);
        assert!(!overlay.exists());
        assert!(!overlay.map().exists());
        assert!(fs::read(&*base).unwrap() == initial);
    }

    #[test]
    fn kept_overlay_reopens_with_the_same_content() {
        let (base, initial) = make_base("keep.img", 64 * 1024);
        let overlay = TempPath::new("keep.overlay");
        let sum = checksum(&base);
        let mode = DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay));

        let mut disk = DiskImage::open(&*base, mode.clone()).unwrap();
        assert!(
            overlay.exists() && overlay.map().exists(),
            "created with its map"
        );
        let model = exercise(&mut disk, initial.clone());
        let blocks = disk.overlay_blocks();
        drop(disk); // no explicit flush: dropping saves the map

        let mut disk = DiskImage::open(&*base, mode.clone()).unwrap();
        assert_eq!(disk.overlay_blocks(), blocks);
        assert!(read_all(&disk) == model);
        // Continue: more writes, flushed this time, then dropped again.
        let mut c = Checked {
            disk: &mut disk,
            model,
        };
        c.write(10 * 4096 + 3, &[0x77; 9000]);
        c.zero(0, 4096, true);
        c.verify();
        let model = c.model;
        disk.flush().unwrap();
        drop(disk);

        let disk = DiskImage::open(&*base, mode).unwrap();
        assert!(read_all(&disk) == model);
        drop(disk);
        assert_eq!(checksum(&base), sum);

        // The map's format: header fields and one bit per block.
        let map = fs::read(overlay.map()).unwrap();
        assert_eq!(&map[..8], b"SMOLVMOV");
        assert_eq!(
            u64::from_le_bytes(map[16..24].try_into().unwrap()),
            64 * 1024
        );
        assert_eq!(u64::from_le_bytes(map[40..48].try_into().unwrap()), 16);
        assert_eq!(map.len(), MAP_HEADER_LEN + 2);
        assert_eq!(map[48] & 1, 1, "block 0 is in the overlay");

        // Replace starts over from the base.
        let replace = DiskMode::Overlay(OverlayTarget::File {
            path: overlay.to_path_buf(),
            keep: true,
            if_exists: IfOverlayExists::Replace,
        });
        let disk = DiskImage::open(&*base, replace).unwrap();
        assert_eq!(disk.overlay_blocks(), Some(0));
        assert!(read_all(&disk) == initial);
    }

    #[test]
    fn reused_overlay_taken_over_with_keep_false_is_consumed() {
        let (base, _) = make_base("consume.img", 8192);
        let overlay = TempPath::new("consume.overlay");
        let mut disk = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay)),
        )
        .unwrap();
        disk.write_at(0, &[4; 100]).unwrap();
        drop(disk);
        let reuse_once = DiskMode::Overlay(OverlayTarget::File {
            path: overlay.to_path_buf(),
            keep: false,
            if_exists: IfOverlayExists::Reuse,
        });
        let disk = DiskImage::open(&*base, reuse_once).unwrap();
        assert_eq!(read_all(&disk)[..100], [4; 100]);
        assert!(!overlay.exists() && !overlay.map().exists());
    }

    #[test]
    fn existing_overlay_is_not_clobbered() {
        let (base, _) = make_base("clobber.img", 8192);
        let overlay = TempPath::new("clobber.overlay");
        fs::write(&*overlay, b"precious").unwrap();
        for keep in [false, true] {
            let mode = DiskMode::Overlay(OverlayTarget::File {
                path: overlay.to_path_buf(),
                keep,
                if_exists: IfOverlayExists::Refuse,
            });
            let err = DiskImage::open(&*base, mode).unwrap_err();
            assert!(matches!(err, DiskError::OverlayExists { .. }), "{err}");
            assert!(err.to_string().contains("refusing to overwrite"));
        }
        assert_eq!(fs::read(&*overlay).unwrap(), b"precious");

        // A stray map next to a new kept overlay is not overwritten either.
        let other = TempPath::new("clobber2.overlay");
        fs::write(other.map(), b"mine").unwrap();
        let mode = DiskMode::Overlay(OverlayTarget::File {
            path: other.to_path_buf(),
            keep: true,
            if_exists: IfOverlayExists::Refuse,
        });
        assert!(matches!(
            DiskImage::open(&*base, mode),
            Err(DiskError::OverlayExists { path }) if path == other.map()
        ));
        assert_eq!(fs::read(other.map()).unwrap(), b"mine");
        // keep: false never touches a map of the same name.
        let disk = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::scratch_file(&*other)),
        )
        .unwrap();
        drop(disk);
        assert_eq!(fs::read(other.map()).unwrap(), b"mine");
    }

    #[test]
    fn reuse_needs_a_valid_map_and_the_same_base() {
        let (base, _) = make_base("reuse.img", 8192);
        let overlay = TempPath::new("reuse.overlay");
        let mode = DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay));

        // An overlay without a map.
        fs::write(&*overlay, [0u8; 8192]).unwrap();
        let err = DiskImage::open(&*base, mode.clone()).unwrap_err();
        assert!(matches!(err, DiskError::OverlayMapMissing { .. }), "{err}");

        // A map that is not one.
        fs::write(overlay.map(), b"garbage").unwrap();
        let err = DiskImage::open(&*base, mode.clone()).unwrap_err();
        assert!(matches!(err, DiskError::OverlayInvalid { .. }), "{err}");

        // A good overlay, then the base changes under it.
        overlay.cleanup();
        drop(DiskImage::open(&*base, mode.clone()).unwrap());
        let map = fs::read(overlay.map()).unwrap();
        let mut truncated = map.clone();
        truncated.pop();
        fs::write(overlay.map(), &truncated).unwrap();
        let err = DiskImage::open(&*base, mode.clone()).unwrap_err();
        assert!(matches!(err, DiskError::OverlayInvalid { .. }), "{err}");
        fs::write(overlay.map(), &map).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&*overlay)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = DiskImage::open(&*base, mode.clone()).unwrap_err();
        assert!(matches!(err, DiskError::OverlayInvalid { .. }), "{err}");
        fs::OpenOptions::new()
            .write(true)
            .open(&*overlay)
            .unwrap()
            .set_len(8192)
            .unwrap();
        drop(DiskImage::open(&*base, mode.clone()).unwrap());

        let f = fs::OpenOptions::new().write(true).open(&*base).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        drop(f);
        let err = DiskImage::open(&*base, mode.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::OverlayBaseChanged {
                    what: "modification time",
                    ..
                }
            ),
            "{err}"
        );
        fs::write(&*base, [0u8; 16384]).unwrap();
        let err = DiskImage::open(&*base, mode).unwrap_err();
        assert!(
            matches!(err, DiskError::OverlayBaseChanged { what: "size", .. }),
            "{err}"
        );
    }

    #[test]
    fn overlay_cannot_be_the_base() {
        let (base, initial) = make_base("self.img", 8192);
        let link = TempPath::new("self-link.img");
        fs::hard_link(&*base, &*link).unwrap();
        for path in [base.to_path_buf(), link.to_path_buf()] {
            for if_exists in [IfOverlayExists::Replace, IfOverlayExists::Reuse] {
                let mode = DiskMode::Overlay(OverlayTarget::File {
                    path: path.clone(),
                    keep: true,
                    if_exists,
                });
                let err = DiskImage::open(&*base, mode).unwrap_err();
                assert!(matches!(err, DiskError::OverlayIsBase { .. }), "{err}");
            }
        }
        assert!(fs::read(&*base).unwrap() == initial);
    }

    #[test]
    fn locks_keep_writers_apart() {
        let (base, _) = make_base("lock.img", 8192);
        let overlay = TempPath::new("lock.overlay");
        let rw = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap();
        let err = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap_err();
        assert!(matches!(err, DiskError::LockedByOthers { .. }), "{err}");
        for mode in [memory(), DiskMode::ReadOnly] {
            let err = DiskImage::open(&*base, mode).unwrap_err();
            assert!(matches!(err, DiskError::LockedByWriter { .. }), "{err}");
            assert!(err.to_string().contains("open read-write by another VM"));
        }
        drop(rw);

        // Readers share; a writer is kept out while any reader is there.
        let a = DiskImage::open(&*base, memory()).unwrap();
        let b = DiskImage::open(&*base, DiskMode::ReadOnly).unwrap();
        let c = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay)),
        )
        .unwrap();
        let err = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap_err();
        assert!(matches!(err, DiskError::LockedByOthers { .. }), "{err}");
        // One overlay file, one user.
        let err = DiskImage::open(
            &*base,
            DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay)),
        )
        .unwrap_err();
        assert!(matches!(err, DiskError::OverlayInUse { .. }), "{err}");
        drop((a, b, c));
        // All locks go with the disks.
        drop(DiskImage::open(&*base, DiskMode::ReadWrite).unwrap());
        drop(
            DiskImage::open(
                &*base,
                DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay)),
            )
            .unwrap(),
        );
    }

    #[test]
    fn out_of_range_requests_are_errors() {
        let (base, _) = make_base("range.img", 8192);
        let overlay = TempPath::new("range.overlay");
        let modes = [
            DiskMode::ReadWrite,
            DiskMode::ReadOnly,
            memory(),
            DiskMode::Overlay(OverlayTarget::scratch_file(&*overlay)),
        ];
        for mode in modes {
            let mut disk = DiskImage::open(&*base, mode.clone()).unwrap();
            let size = disk.size();
            let mut buf = [0u8; 16];
            let oor = |r: Result<(), DiskError>| matches!(r, Err(DiskError::OutOfRange { .. }));
            assert!(oor(disk.read_at(size, &mut buf)), "{mode:?}");
            assert!(oor(disk.read_at(size - 8, &mut buf)));
            assert!(oor(disk.read_at(u64::MAX, &mut buf)));
            assert!(oor(disk.read_at(u64::MAX - 4, &mut buf)));
            assert!(disk.read_at(size, &mut []).is_ok(), "empty read at the end");
            assert!(oor(disk.read_at(size + 1, &mut [])));
            if !disk.is_read_only() {
                assert!(oor(disk.write_at(size - 8, &buf)));
                assert!(oor(disk.write_at(u64::MAX - 4, &buf)));
                assert!(oor(disk.discard(u64::MAX, 2)));
                assert!(oor(disk.discard(1, u64::MAX)));
                assert!(oor(disk.write_zeroes(size, 1)));
                assert!(oor(disk.write_zeroes(4096, u64::MAX - 4095)));
                assert!(disk.write_at(size, &[]).is_ok());
                assert!(disk.discard(size, 0).is_ok());
            }
            let err = disk.read_at(u64::MAX, &mut buf).unwrap_err();
            assert!(
                err.to_string().contains("outside the disk (8192 bytes)"),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_images_are_rejected_with_advice() {
        let p = TempPath::new("odd.img");
        fs::write(&*p, [0u8; 1000]).unwrap();
        let err = DiskImage::open(&*p, DiskMode::ReadOnly).unwrap_err();
        assert!(
            matches!(err, DiskError::SizeNotSectorMultiple { size: 1000, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("not a multiple of the 512-byte sector size"),
            "{msg}"
        );
        assert!(msg.contains("truncate -s 1024"), "{msg}");
        for mode in [DiskMode::ReadWrite, memory()] {
            let err = DiskImage::open(&*p, mode).unwrap_err();
            assert!(matches!(err, DiskError::SizeNotSectorMultiple { .. }));
        }

        fs::write(&*p, []).unwrap();
        assert!(matches!(
            DiskImage::open(&*p, DiskMode::ReadOnly),
            Err(DiskError::Empty { .. })
        ));

        p.cleanup();
        let err = DiskImage::open(&*p, DiskMode::ReadWrite).unwrap_err();
        assert!(matches!(err, DiskError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&p.display().to_string()));

        for mode in [DiskMode::ReadWrite, DiskMode::ReadOnly] {
            let err = DiskImage::open(std::env::temp_dir(), mode).unwrap_err();
            assert!(
                matches!(
                    err,
                    DiskError::NotADiskImage {
                        what: "a directory",
                        ..
                    }
                ),
                "{err}"
            );
        }
        let err = DiskImage::open("/dev/null", DiskMode::ReadOnly).unwrap_err();
        assert!(matches!(
            err,
            DiskError::NotADiskImage {
                what: "a character device",
                ..
            }
        ));
    }

    #[test]
    fn permission_denied_says_which_access() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            println!("note: running as root, which bypasses file permissions; skipped");
            return;
        }
        let (base, _) = make_base("perm.img", 512);
        fs::set_permissions(&*base, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        let err = DiskImage::open(&*base, DiskMode::ReadWrite).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::PermissionDenied {
                    access: "reading and writing",
                    ..
                }
            ),
            "{err}"
        );
        assert!(DiskImage::open(&*base, DiskMode::ReadOnly).is_ok());
    }

    #[test]
    fn ids_are_validated_and_padded() {
        let (base, _) = make_base("id.img", 512);
        let disk = DiskImage::open(&*base, DiskMode::ReadOnly).unwrap();
        assert_eq!(disk.id(), [0; DISK_ID_LEN]);
        let disk = disk.with_id("12345678901234567890").unwrap();
        assert_eq!(&disk.id(), b"12345678901234567890");
        assert!(format!("{disk:?}").contains("12345678901234567890"));
        for bad in ["123456789012345678901", "a b", "tab\t", "naïve"] {
            let disk = DiskImage::open(&*base, DiskMode::ReadOnly).unwrap();
            assert!(
                matches!(disk.with_id(bad), Err(DiskError::InvalidId { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn boxed_disks_forward_everything() {
        let (base, _) = make_base("boxed.img", 8192);
        let disk = DiskImage::open(&*base, memory())
            .unwrap()
            .with_id("boxed")
            .unwrap();
        let mut boxed: Box<dyn Disk> = Box::new(disk);
        boxed.write_at(10, b"abc").unwrap();
        boxed.write_zeroes(0, 4).unwrap();
        boxed.discard(4096, 4096).unwrap();
        boxed.flush().unwrap();
        let mut buf = [0u8; 14];
        boxed.read_at(0, &mut buf).unwrap();
        assert_eq!((&buf[..4], &buf[10..13]), (&[0u8; 4][..], &b"abc"[..]));
        assert_eq!(
            (boxed.size(), boxed.sectors(), boxed.is_read_only()),
            (8192, 16, false)
        );
        assert_eq!(&boxed.id()[..5], b"boxed");
    }

    #[test]
    fn bitmap_runs_and_ranges() {
        let mut bm = BlockBitmap::new(300 * OVERLAY_BLOCK_SIZE).unwrap();
        assert_eq!(bm.run_end(0, 300), 300);
        assert!(bm.set_range(60, 130));
        assert!(!bm.set_range(64, 128));
        assert!(bm.set(200));
        assert!(!bm.set(200));
        assert_eq!(bm.count(), 71);
        assert_eq!(bm.run_end(0, 300), 60);
        assert_eq!(bm.run_end(59, 300), 60);
        assert_eq!(bm.run_end(60, 300), 130);
        assert_eq!(bm.run_end(61, 100), 100);
        assert_eq!(bm.run_end(130, 300), 200);
        assert_eq!(bm.run_end(200, 300), 201);
        assert_eq!(bm.run_end(201, 300), 300);
        assert!(bm.set_range(0, 300));
        assert_eq!(bm.count(), 300);
        assert_eq!(bm.run_end(0, 300), 300);
        // Serialization round trip, ignoring stray bits past the last block.
        let mut bytes = Vec::new();
        bm.save(&mut bytes).unwrap();
        assert_eq!(bytes.len(), 38);
        assert_eq!(bytes[37], 0x0f);
        bytes[37] = 0xff;
        let mut back = BlockBitmap::new(300 * OVERLAY_BLOCK_SIZE).unwrap();
        back.load(&bytes);
        assert_eq!(back.count(), 300);
        assert_eq!(back.words, bm.words);
    }

    /// xorshift64*: a deterministic stream for the randomized model test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_operations_match_a_model() {
        let size = 40 * 4096 + 1536;
        let (base, initial) = make_base("random.img", size);
        let sum = checksum(&base);
        let overlay = TempPath::new("random.overlay");
        let rw_copy = TempPath::new("random-rw.img");
        fs::write(&*rw_copy, &initial).unwrap();
        let disks = [
            DiskImage::open(&*base, memory()).unwrap(),
            DiskImage::open(
                &*base,
                DiskMode::Overlay(OverlayTarget::persistent_file(&*overlay)),
            )
            .unwrap(),
            DiskImage::open(&*rw_copy, DiskMode::ReadWrite).unwrap(),
        ];
        for (seed, mut disk) in disks.into_iter().enumerate() {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + seed as u64);
            let mut c = Checked {
                disk: &mut disk,
                model: initial.clone(),
            };
            let mut buf = vec![0u8; 3 * 4096];
            for step in 0..600 {
                // Offsets near block boundaries are the interesting ones.
                let off = match rng.below(3) {
                    0 => rng.below(size),
                    1 => rng.below(size / 4096 + 1) * 4096,
                    _ => (rng.below(size / 4096 + 1) * 4096).saturating_sub(rng.below(8)),
                }
                .min(size);
                let len = rng.below(3 * 4096 + 1).min(size - off);
                match rng.below(5) {
                    0 | 1 => {
                        let data: Vec<u8> = (0..len).map(|i| (step as u64 + i) as u8).collect();
                        c.write(off, &data);
                    }
                    2 => c.zero(off, len, rng.below(2) == 0),
                    3 => {
                        c.disk.read_at(off, &mut buf[..len as usize]).unwrap();
                        assert_eq!(
                            buf[..len as usize],
                            c.model[off as usize..(off + len) as usize],
                            "disk {seed} step {step}: read {len} at {off}"
                        );
                    }
                    _ => c.disk.flush().unwrap(),
                }
            }
            c.verify();
        }
        assert_eq!(checksum(&base), sum);
    }
}

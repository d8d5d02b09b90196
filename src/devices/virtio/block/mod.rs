//! virtio-blk: the block device and the host storage it sits on.
//!
//! - [`disk`]: disk images on the host — read-write, read-only, or under a private
//!   copy-on-write overlay (a sparse file or memory) so many VMs share one base image — with
//!   flush, discard and write-zeroes, and every guest offset bounds-checked.
//! - [`device`]: the virtio-blk device ([`Block`]) that serves guest requests from a [`Disk`].
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::block::disk::{Disk, DiskImage, DiskMode, OverlayTarget};
//!
//! let base = std::env::temp_dir().join(format!("smolvm-doc-block-{}.img", std::process::id()));
//! std::fs::write(&base, vec![0u8; 4096])?;
//! let mut disk = DiskImage::open(&base, DiskMode::Overlay(OverlayTarget::Memory))?;
//! disk.write_at(0, b"sandbox scratch")?;
//! assert_eq!(disk.sectors(), 8);
//! # drop(disk);
//! # std::fs::remove_file(&base)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod device;
pub mod disk;

pub use device::{
    Block, BlockState, BlockStats, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
pub use disk::{Disk, DiskError, DiskImage, DiskMode, OverlayTarget};

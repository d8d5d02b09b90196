//! virtio-blk: the block device and the host storage it sits on.
//!
//! - [`disk`]: disk images on the host — read-write, read-only, or under a private
//!   copy-on-write overlay (a sparse file or memory) so many VMs share one base image — with
//!   flush, discard and write-zeroes, and every guest offset bounds-checked.
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

pub mod disk;

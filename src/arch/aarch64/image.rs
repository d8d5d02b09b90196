//! The arm64 Linux `Image` (Linux `Documentation/arch/arm64/booting.rst`): header parsing,
//! and where the kernel, initrd and device tree go in guest RAM.
//!
//! ```text
//! RAM_START (2 MiB aligned)
//!   + text_offset        kernel Image, image_size bytes (code, data and BSS)
//!   ...                  free for the kernel
//!   initrd               page aligned, just below the device tree block
//!   last 2 MiB block     device tree (at most 2 MiB, 8-byte aligned, in a 2 MiB block of
//!                        its own as booting.rst recommends)
//! RAM end
//! ```

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::layout::{FDT_MAX_SIZE, KERNEL_ALIGN};
use crate::boot::BootError;
use crate::memory::GuestMemory;

/// `"ARM\x64"`, little-endian, at offset 0x38 of the header.
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
/// Size of the header.
pub const HEADER_SIZE: usize = 64;
/// `text_offset` of kernels older than 3.17, whose header has `image_size` 0.
pub const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
const PAGE_SIZE: u64 = 0x1000;

/// Why a file is not a bootable arm64 `Image`. Carried by
/// [`BootError::Arm64Image`], whose message says what to
/// pass instead.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::image::{ImageError, ImageHeader};
/// assert_eq!(ImageHeader::parse(&[0u8; 10]), Err(ImageError::Truncated(10)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Shorter than the 64-byte header.
    #[error("{0} bytes, shorter than the 64-byte arm64 Image header")]
    Truncated(usize),
    /// No `ARM\x64` magic at offset 0x38.
    #[error("no arm64 Image magic at offset 0x38 (found {0:#010x})")]
    BadMagic(u32),
    /// A gzip stream (`Image.gz`, or a compressed `vmlinuz`).
    #[error("the file is gzip-compressed; decompress it first (gunzip)")]
    Compressed,
    /// An ELF file (`vmlinux`).
    #[error("the file is an ELF vmlinux, not the Image (arch/arm64/boot/Image)")]
    Elf,
    /// Flags bit 0: a big-endian kernel.
    #[error("the kernel is big-endian; build a little-endian kernel")]
    BigEndian,
    /// `text_offset` is not a multiple of the 4 KiB page size.
    #[error("text_offset {0:#x} is not a multiple of 4 KiB")]
    TextOffset(u64),
}

/// The fields of an arm64 `Image` header that placement needs.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::image::{ImageHeader, IMAGE_MAGIC};
/// let mut h = [0u8; 64];
/// h[16..24].copy_from_slice(&(20u64 << 20).to_le_bytes()); // image_size
/// h[0x38..0x3c].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
/// let header = ImageHeader::parse(&h)?;
/// assert_eq!((header.text_offset, header.image_size), (0, 20 << 20));
/// # Ok::<(), smolvm::arch::aarch64::image::ImageError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB aligned base at which the image must be loaded
    /// ([`LEGACY_TEXT_OFFSET`] when `image_size` is 0).
    pub text_offset: u64,
    /// Bytes from the load address the kernel uses (including BSS); 0 for kernels before 3.17,
    /// where the file size has to do.
    pub image_size: u64,
    /// Header flags: bit 0 big-endian, bits 1-2 page size, bit 3 "may be placed anywhere".
    pub flags: u64,
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

impl ImageHeader {
    /// Reads the header at the start of `bytes`.
    ///
    /// # Errors
    /// [`ImageError`]; never panics on any input.
    ///
    /// # Example
    /// See [`ImageHeader`].
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            return Err(ImageError::Compressed);
        }
        if bytes.starts_with(b"\x7fELF") {
            return Err(ImageError::Elf);
        }
        if bytes.len() < HEADER_SIZE {
            return Err(ImageError::Truncated(bytes.len()));
        }
        let magic = u32::from_le_bytes([bytes[0x38], bytes[0x39], bytes[0x3a], bytes[0x3b]]);
        if magic != IMAGE_MAGIC {
            return Err(ImageError::BadMagic(magic));
        }
        let mut text_offset = le64(bytes, 8);
        let image_size = le64(bytes, 16);
        let flags = le64(bytes, 24);
        if image_size == 0 {
            // booting.rst: "Where image_size is zero, text_offset can be assumed to be
            // 0x80000." (and the flags field is undefined then).
            text_offset = LEGACY_TEXT_OFFSET;
            return Ok(ImageHeader {
                text_offset,
                image_size,
                flags: 0,
            });
        }
        if flags & 1 != 0 {
            return Err(ImageError::BigEndian);
        }
        if text_offset % PAGE_SIZE != 0 {
            return Err(ImageError::TextOffset(text_offset));
        }
        Ok(ImageHeader {
            text_offset,
            image_size,
            flags,
        })
    }

    /// Bytes the kernel occupies from its load address: `image_size`, or for a legacy header
    /// the file length.
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::image::ImageHeader;
    /// let legacy = ImageHeader { text_offset: 0x80000, image_size: 0, flags: 0 };
    /// assert_eq!(legacy.effective_size(1234), 1234);
    /// ```
    pub fn effective_size(&self, file_len: u64) -> u64 {
        if self.image_size == 0 {
            file_len
        } else {
            self.image_size
        }
    }
}

/// Where the kernel, initrd and device tree go.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::image::{plan, ImageHeader};
/// let header = ImageHeader { text_offset: 0, image_size: 30 << 20, flags: 0 };
/// let p = plan(0x8000_0000, 256 << 20, &header, 20 << 20, Some(4 << 20))?;
/// assert_eq!(p.kernel_start, 0x8000_0000);
/// assert_eq!(p.fdt_start, 0x8000_0000 + (254 << 20));
/// assert_eq!(p.initrd_start, Some(p.fdt_start - (4 << 20)));
/// # Ok::<(), smolvm::boot::BootError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The kernel's load address and entry point.
    pub kernel_start: u64,
    /// First address past the kernel's `image_size`.
    pub kernel_end: u64,
    /// The initrd's address (page aligned), when there is one.
    pub initrd_start: Option<u64>,
    /// The device tree's address: the start of the last whole 2 MiB block of RAM.
    pub fdt_start: u64,
}

/// Decides the [`Placement`] in RAM `ram_start .. ram_start + ram_size` for a kernel with
/// `header` whose file is `file_len` bytes, and an initrd of `initrd_size` bytes.
///
/// # Errors
/// [`BootError::MemoryTooSmall`] when they do not fit without overlapping.
///
/// # Example
/// See [`Placement`].
pub fn plan(
    ram_start: u64,
    ram_size: u64,
    header: &ImageHeader,
    file_len: u64,
    initrd_size: Option<u64>,
) -> Result<Placement, BootError> {
    let too_small = |what, needed: u64| BootError::MemoryTooSmall {
        what,
        needed,
        available: ram_size,
    };
    let base = ram_start
        .checked_next_multiple_of(KERNEL_ALIGN)
        .ok_or(too_small("kernel", u64::MAX))?;
    let kernel_start = base.saturating_add(header.text_offset);
    let kernel_end = kernel_start.saturating_add(header.effective_size(file_len));
    let ram_end = ram_start.saturating_add(ram_size);
    // Kernel + one 2 MiB block for the device tree, at the least.
    let needed = (kernel_end - ram_start).saturating_add(FDT_MAX_SIZE);
    let fdt_start = ram_end
        .checked_sub(FDT_MAX_SIZE)
        .map(|v| v / KERNEL_ALIGN * KERNEL_ALIGN)
        .filter(|&f| f >= kernel_end && f >= ram_start)
        .ok_or(too_small("kernel", needed))?;
    let initrd_start = match initrd_size {
        None => None,
        Some(size) => {
            let start = fdt_start
                .checked_sub(size)
                .map(|v| v / PAGE_SIZE * PAGE_SIZE)
                .filter(|&s| s >= kernel_end)
                .ok_or(too_small(
                    "initrd",
                    needed.saturating_add(size.next_multiple_of(PAGE_SIZE)),
                ))?;
            Some(start)
        }
    };
    Ok(Placement {
        kernel_start,
        kernel_end,
        initrd_start,
        fdt_start,
    })
}

/// An arm64 kernel and initrd loaded into guest memory.
///
/// # Example
/// See [`load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// The parsed header.
    pub header: ImageHeader,
    /// Where everything went.
    pub placement: Placement,
    /// The initrd `(address, size)`, when one was loaded.
    pub initrd: Option<(u64, u64)>,
}

/// Reads the kernel `Image` at `kernel` (and the initrd, if any) and writes them into the
/// RAM `ram_start .. ram_start + ram_size` of `mem` according to [`plan`]. The device tree
/// goes to [`Placement::fdt_start`] afterwards.
///
/// # Errors
/// [`BootError::KernelFile`] / [`BootError::InitrdFile`] for unreadable files,
/// [`BootError::Arm64Image`] for a file that is not an arm64 `Image`,
/// [`BootError::MemoryTooSmall`], [`BootError::GuestMemory`].
///
/// # Example
/// ```no_run
/// use smolvm::arch::aarch64::{image, layout};
/// let size = 256 << 20;
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(layout::RAM_START), size)])?;
/// let loaded = image::load(&mem, layout::RAM_START, size as u64, "Image".as_ref(), None)?;
/// println!("kernel entry {:#x}", loaded.placement.kernel_start);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load(
    mem: &GuestMemory,
    ram_start: u64,
    ram_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<LoadedImage, BootError> {
    let image = std::fs::read(kernel).map_err(|source| BootError::KernelFile {
        path: kernel.into(),
        source,
    })?;
    let header = ImageHeader::parse(&image).map_err(|source| BootError::Arm64Image {
        path: kernel.into(),
        source,
    })?;
    let initrd_bytes = match initrd {
        Some(p) => Some(std::fs::read(p).map_err(|source| BootError::InitrdFile {
            path: p.into(),
            source,
        })?),
        None => None,
    };
    let placement = plan(
        ram_start,
        ram_size,
        &header,
        image.len() as u64,
        initrd_bytes.as_ref().map(|b| b.len() as u64),
    )?;
    // Bytes past image_size (an appended signature, say) are not part of the kernel.
    let copy = (header.effective_size(image.len() as u64) as usize).min(image.len());
    mem.write_slice(&image[..copy], GuestAddress(placement.kernel_start))
        .map_err(|_| BootError::GuestMemory {
            what: "kernel",
            addr: placement.kernel_start,
        })?;
    let initrd = match (initrd_bytes, placement.initrd_start) {
        (Some(bytes), Some(addr)) => {
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|_| BootError::GuestMemory {
                    what: "initrd",
                    addr,
                })?;
            Some((addr, bytes.len() as u64))
        }
        _ => None,
    };
    Ok(LoadedImage {
        header,
        placement,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout::RAM_START;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        h[0..4].copy_from_slice(b"MZ\0\0"); // an EFI stub's code0
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[0x38..0x3c].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn parses_a_modern_header() {
        let h = ImageHeader::parse(&header(0, 0x1234_0000, 0b1010)).unwrap();
        assert_eq!(
            h,
            ImageHeader {
                text_offset: 0,
                image_size: 0x1234_0000,
                flags: 0b1010
            }
        );
        let h = ImageHeader::parse(&header(0x8_0000, 0x100_0000, 2)).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
    }

    #[test]
    fn legacy_header_assumes_the_old_text_offset() {
        let h = ImageHeader::parse(&header(0x1234, 0, 1)).unwrap();
        assert_eq!(h.text_offset, LEGACY_TEXT_OFFSET);
        assert_eq!(h.image_size, 0);
        assert_eq!(h.effective_size(5 << 20), 5 << 20);
    }

    #[test]
    fn rejects_what_is_not_an_image() {
        let mut bad = header(0, 1 << 20, 0);
        bad[0x38] = b'X';
        assert!(matches!(
            ImageHeader::parse(&bad),
            Err(ImageError::BadMagic(_))
        ));
        assert_eq!(
            ImageHeader::parse(&header(0, 1 << 20, 0)[..63]),
            Err(ImageError::Truncated(63))
        );
        assert_eq!(ImageHeader::parse(&[]), Err(ImageError::Truncated(0)));
        assert_eq!(
            ImageHeader::parse(&[0x1f, 0x8b, 8, 0]),
            Err(ImageError::Compressed)
        );
        assert_eq!(ImageHeader::parse(b"\x7fELF\x02\x01"), Err(ImageError::Elf));
        assert_eq!(
            ImageHeader::parse(&header(0, 1 << 20, 1)),
            Err(ImageError::BigEndian)
        );
        assert_eq!(
            ImageHeader::parse(&header(0x80, 1 << 20, 0)),
            Err(ImageError::TextOffset(0x80))
        );
        for e in [
            ImageError::Compressed,
            ImageError::BadMagic(0),
            ImageError::Elf,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn placement_keeps_kernel_initrd_and_fdt_apart() {
        let h = ImageHeader {
            text_offset: 0x8_0000,
            image_size: 40 << 20,
            flags: 0,
        };
        let p = plan(RAM_START, 128 << 20, &h, 30 << 20, Some(10 << 20 | 5)).unwrap();
        assert_eq!(p.kernel_start, RAM_START + 0x8_0000);
        assert_eq!(
            (p.kernel_start - 0x8_0000) % KERNEL_ALIGN,
            0,
            "2 MiB aligned base"
        );
        assert_eq!(p.kernel_end, p.kernel_start + (40 << 20));
        assert_eq!(p.fdt_start, RAM_START + (126 << 20));
        assert_eq!(p.fdt_start % 8, 0);
        assert!(p.fdt_start + FDT_MAX_SIZE <= RAM_START + (128 << 20));
        let initrd = p.initrd_start.unwrap();
        assert_eq!(initrd % PAGE_SIZE, 0);
        assert!(initrd >= p.kernel_end);
        assert!(initrd + (10 << 20 | 5) <= p.fdt_start);
    }

    #[test]
    fn memory_that_is_not_a_multiple_of_2_mib_still_holds_the_fdt() {
        let h = ImageHeader {
            text_offset: 0,
            image_size: 1 << 20,
            flags: 0,
        };
        let p = plan(RAM_START, (16 << 20) + 0x1000, &h, 1 << 20, None).unwrap();
        assert_eq!(p.fdt_start, RAM_START + (14 << 20));
        assert_eq!(p.initrd_start, None);
    }

    #[test]
    fn too_little_memory_is_a_typed_error() {
        let h = ImageHeader {
            text_offset: 0,
            image_size: 30 << 20,
            flags: 0,
        };
        match plan(RAM_START, 16 << 20, &h, 20 << 20, None) {
            Err(BootError::MemoryTooSmall {
                what: "kernel",
                needed,
                available,
            }) => {
                assert_eq!(needed, 32 << 20);
                assert_eq!(available, 16 << 20);
            }
            other => panic!("{other:?}"),
        }
        match plan(RAM_START, 40 << 20, &h, 20 << 20, Some(20 << 20)) {
            Err(e @ BootError::MemoryTooSmall { what: "initrd", .. }) => {
                assert!(e.to_string().contains("memory_mib"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(plan(RAM_START, 0, &h, 0, None).is_err());
        assert!(plan(u64::MAX - 10, 1 << 30, &h, 0, None).is_err());
    }

    #[test]
    fn load_writes_kernel_and_initrd_into_guest_memory() {
        let dir = std::env::temp_dir().join(format!("smolvm-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kpath = dir.join("Image");
        let ipath = dir.join("initrd");
        let mut kernel = header(0, 0x3000, 0);
        kernel.resize(0x2000, 0xaa);
        kernel.extend_from_slice(&[0xee; 0x2000]); // past image_size: not copied
        std::fs::write(&kpath, &kernel).unwrap();
        std::fs::write(&ipath, b"initrd!").unwrap();
        let size = 8u64 << 20;
        let mem = crate::memory::create(&[(GuestAddress(RAM_START), size as usize)]).unwrap();
        let loaded = load(&mem, RAM_START, size, &kpath, Some(&ipath)).unwrap();
        assert_eq!(loaded.placement.kernel_start, RAM_START);
        let mut got = vec![0u8; 0x4000];
        mem.read_slice(&mut got, GuestAddress(RAM_START)).unwrap();
        assert_eq!(&got[..0x2000], &kernel[..0x2000]);
        assert_eq!(&got[0x2000..0x3000], &[0xee; 0x1000][..]);
        assert_eq!(
            &got[0x3000..],
            &[0u8; 0x1000][..],
            "only image_size bytes copied"
        );
        let (iaddr, isize) = loaded.initrd.unwrap();
        assert_eq!(isize, 7);
        let mut got = [0u8; 7];
        mem.read_slice(&mut got, GuestAddress(iaddr)).unwrap();
        assert_eq!(&got, b"initrd!");

        std::fs::write(&kpath, [0x1f, 0x8b, 8, 0]).unwrap();
        let err = load(&mem, RAM_START, size, &kpath, None).unwrap_err();
        assert!(matches!(err, BootError::Arm64Image { .. }));
        assert!(err.to_string().contains("gunzip"), "{err}");
        let err = load(&mem, RAM_START, size, &dir.join("missing"), None).unwrap_err();
        assert!(matches!(err, BootError::KernelFile { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

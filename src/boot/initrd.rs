//! Initial ramdisk placement.

use std::fs::File;
use std::io;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::{low_ram_end, BootError, LoadedKernel};
use crate::memory::GuestMemory;

/// Where the initrd was placed.
///
/// # Example
/// ```
/// use smolvm::boot::{load_initrd, KernelFormat, LoadedKernel};
/// let path = std::env::temp_dir().join(format!("smolvm-doc-initrd-{}", std::process::id()));
/// std::fs::write(&path, [0u8; 5000]).unwrap();
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let kernel = LoadedKernel {
///     format: KernelFormat::Elf,
///     entry: 0x100_0000,
///     end: 0x200_0000,
///     setup_header: vec![],
/// };
/// let initrd = load_initrd(&mem, &path, &kernel).unwrap();
/// std::fs::remove_file(&path).unwrap();
/// assert_eq!((initrd.size, initrd.addr % 4096), (5000, 0));
/// assert!(initrd.addr >= kernel.end && initrd.addr + initrd.size <= 64 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRange {
    /// Guest physical address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Page size the initrd start is aligned to (the boot protocol requires page alignment).
const PAGE_SIZE: u64 = 0x1000;
/// Largest single read: Linux caps `read(2)` at just under 2 GiB, so big files take several.
const MAX_READ: u64 = 1 << 30;

/// Loads the initrd at `path` as high as possible in low RAM (page aligned, above the kernel).
///
/// High placement keeps it clear of the kernel's decompression and early allocations, which
/// grow up from the kernel image; the top is the end of the first RAM region, capped at the
/// MMIO gap so it stays below 4 GiB (the zero page fields are 32-bit). The file is streamed
/// straight into guest memory.
///
/// # Errors
/// [`BootError::InitrdFile`] if the file cannot be read, [`BootError::MemoryTooSmall`] if it
/// does not fit between the kernel and the top of low RAM.
///
/// # Example
/// ```
/// use smolvm::boot::{load_initrd, BootError, KernelFormat, LoadedKernel};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let kernel = LoadedKernel {
///     format: KernelFormat::Elf,
///     entry: 0x100_0000,
///     end: 0x200_0000,
///     setup_header: Vec::new(),
/// };
/// let err = load_initrd(&mem, "/nonexistent/initrd".as_ref(), &kernel).unwrap_err();
/// assert!(matches!(err, BootError::InitrdFile { .. }));
/// ```
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdRange, BootError> {
    let file_err = |source: io::Error| BootError::InitrdFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();

    let top = low_ram_end(mem);
    let bottom = kernel
        .end
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let available = top.saturating_sub(bottom);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= bottom => a,
        _ => {
            return Err(BootError::MemoryTooSmall {
                what: "initrd",
                needed: size,
                available,
            })
        }
    };

    let mut done = 0u64;
    while done < size {
        let chunk = (size - done).min(MAX_READ) as usize;
        let n = mem
            .read_volatile_from(GuestAddress(addr + done), &mut file, chunk)
            .map_err(|e| file_err(io::Error::other(e)))?;
        if n == 0 {
            return Err(file_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank to {done} bytes while loading (was {size})"),
            )));
        }
        done += n as u64;
    }
    log::debug!("initrd {path:?}: {size} bytes at {addr:#x}");
    Ok(InitrdRange { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::kernel::tests::{mem, TempFile};
    use crate::boot::KernelFormat;

    fn kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end,
            setup_header: Vec::new(),
        }
    }

    #[test]
    fn placed_high_aligned_and_intact() {
        let data: Vec<u8> = (0..10_001u32).map(|i| (i % 251) as u8).collect();
        let f = TempFile::new("initrd", &data);
        let m = mem(64 << 20);
        let k = kernel(0x180_0123);
        let r = load_initrd(&m, &f.0, &k).unwrap();
        assert_eq!(r.size, data.len() as u64);
        assert_eq!(r.addr % PAGE_SIZE, 0);
        assert!(r.addr >= k.end);
        assert!(r.addr + r.size <= 64 << 20);
        assert!(
            r.addr + r.size > (64 << 20) - PAGE_SIZE,
            "not as high as possible"
        );
        let mut back = vec![0u8; data.len()];
        m.read_slice(&mut back, GuestAddress(r.addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn stays_below_the_mmio_gap() {
        use crate::arch::x86_64::layout::{guest_ram_ranges, MMIO_GAP_START};
        let ranges: Vec<_> = guest_ram_ranges(MMIO_GAP_START + (1 << 20))
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let m = crate::memory::create(&ranges).unwrap();
        let f = TempFile::new("initrd", &[7u8; 100]);
        let r = load_initrd(&m, &f.0, &kernel(0x200_0000)).unwrap();
        assert_eq!(r.addr, MMIO_GAP_START - PAGE_SIZE);
    }

    #[test]
    fn too_big_is_memory_too_small() {
        let f = TempFile::new("initrd", &vec![1u8; 3 << 20]);
        let m = mem(16 << 20);
        let e = load_initrd(&m, &f.0, &kernel(14 << 20)).unwrap_err();
        match e {
            BootError::MemoryTooSmall {
                what: "initrd",
                needed,
                available,
            } => {
                assert_eq!(needed, 3 << 20);
                assert_eq!(available, 2 << 20);
            }
            other => panic!("{other:?}"),
        }
        // A kernel ending past RAM leaves nothing.
        let e = load_initrd(&m, &f.0, &kernel(u64::MAX)).unwrap_err();
        assert!(matches!(
            e,
            BootError::MemoryTooSmall { what: "initrd", .. }
        ));
    }

    #[test]
    fn missing_file_is_initrd_file_error() {
        let m = mem(16 << 20);
        let e = load_initrd(&m, Path::new("/nonexistent/initrd.img"), &kernel(0)).unwrap_err();
        assert!(matches!(e, BootError::InitrdFile { .. }));
    }
}

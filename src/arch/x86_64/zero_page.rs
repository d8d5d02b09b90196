//! The Linux zero page (`struct boot_params`): setup header, command line pointer, initrd and
//! e820 memory map, for 64-bit entry through the Linux boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::arch::x86_64::memmap::MemoryMapEntry;
use crate::boot::{BootError, InitrdRange, LoadedKernel};
use crate::memory::GuestMemory;

/// `boot_flag` value (the boot sector signature) the kernel checks.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Default `kernel_alignment` for ELF kernels (16 MiB, the x86_64 default).
pub const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `loadflags`: protected-mode code is loaded at 1 MiB or above.
pub const LOADED_HIGH: u8 = 0x1;

/// Builds the zero page: the bzImage's own setup header when there is one (the decompressor
/// reads `init_size`, `kernel_alignment`, ... from it), else a minimal valid one; then the
/// loader fields, command line (`cmdline_len` bytes including the NUL, at [`CMDLINE_START`]),
/// initrd and `memmap` as e820 table.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{memmap, zero_page};
/// use smolvm::boot::{KernelFormat, LoadedKernel};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 32 << 20)]).unwrap();
/// let kernel = LoadedKernel { format: KernelFormat::Elf, entry: 0x100_0000, end: 0x110_0000, setup_header: vec![] };
/// let params = zero_page::build(&kernel, 10, None, &memmap::memory_map(&mem)).unwrap();
/// assert_eq!({ params.hdr.header }, zero_page::HDRS_MAGIC);
/// assert_eq!(params.e820_entries, 3);
/// ```
pub fn build(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdRange>,
    memmap: &[MemoryMapEntry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if kernel.setup_header.is_empty() {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    } else {
        let dst = params.hdr.as_mut_slice();
        let n = dst.len().min(kernel.setup_header.len());
        dst[..n].copy_from_slice(&kernel.setup_header[..n]);
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        let (Ok(image), Ok(size)) = (u32::try_from(initrd.addr), u32::try_from(initrd.size)) else {
            return Err(BootError::GuestMemory {
                what: "initrd (must lie below 4 GiB)",
                addr: initrd.addr,
            });
        };
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = size;
    }
    if memmap.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::GuestMemory {
            what: "e820 map (too many entries)",
            addr: ZERO_PAGE_START,
        });
    }
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, m) in table.iter_mut().zip(memmap) {
        *slot = boot_e820_entry {
            addr: m.addr,
            size: m.size,
            r#type: m.kind,
        };
    }
    params.e820_table = table;
    params.e820_entries = memmap.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{layout, zero_page};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// zero_page::write(&mem, &Default::default()).unwrap();
/// ```
pub fn write(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory {
            what: "zero page",
            addr: ZERO_PAGE_START,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::*;
    use crate::arch::x86_64::memmap::{memory_map, E820_RAM, E820_RESERVED};
    use crate::boot::KernelFormat;

    fn guest(size: u64) -> GuestMemory {
        let ranges: Vec<_> = guest_ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        crate::memory::create(&ranges).unwrap()
    }

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: Vec::new(),
        }
    }

    fn write_and_read(mem: &GuestMemory, k: &LoadedKernel, i: Option<InitrdRange>) -> boot_params {
        let p = build(k, 42, i, &memory_map(mem)).unwrap();
        write(mem, &p).unwrap();
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn e820(p: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = p.e820_table;
        table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    #[test]
    fn fields_for_128mib_guest() {
        let mem = guest(128 << 20);
        let initrd = InitrdRange {
            addr: 0x700_0000,
            size: 0x12345,
        };
        let p = write_and_read(&mem, &elf_kernel(), Some(initrd));
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, 0x5372_6448);
        assert_eq!(h.type_of_loader, 0xff);
        assert_eq!({ h.kernel_alignment }, 0x100_0000);
        assert_eq!({ h.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ h.cmdline_size }, 42);
        assert_eq!({ h.ramdisk_image }, 0x700_0000);
        assert_eq!({ h.ramdisk_size }, 0x12345);
        assert_eq!(h.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!(
            e820(&p),
            [
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        // Raw offsets, as the kernel reads them.
        let mut raw = [0u8; 4096];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        assert_eq!(raw[0x1e8], 3);
        assert_eq!(&raw[0x202..0x206], b"HdrS");
        assert_eq!(&raw[0x228..0x22c], &(CMDLINE_START as u32).to_le_bytes());
        assert_eq!(
            &raw[0x2d0 + 20 + 8..0x2d0 + 20 + 16],
            &(HIMEM_START - EBDA_START).to_le_bytes()
        );
    }

    #[test]
    fn e820_for_guest_above_4gib() {
        let size = (4u64 << 30) + (512 << 20);
        let mem = guest(size);
        let p = write_and_read(&mem, &elf_kernel(), None);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!(
            e820(&p),
            [
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM),
                (MMIO_GAP_END, size - MMIO_GAP_START, E820_RAM),
            ]
        );
        for (a, s, _) in e820(&p) {
            assert!(
                a + s <= MMIO_GAP_START || a >= MMIO_GAP_END,
                "gap not skipped"
            );
        }
    }

    #[test]
    fn bzimage_header_is_kept() {
        let mut hdr = vec![0u8; 0x7b];
        hdr[0] = 27; // setup_sects
        hdr[0x202 - 0x1f1..0x206 - 0x1f1].copy_from_slice(b"HdrS");
        hdr[0x260 - 0x1f1..0x264 - 0x1f1].copy_from_slice(&0x222_0000u32.to_le_bytes());
        let k = LoadedKernel {
            format: KernelFormat::BzImage,
            setup_header: hdr,
            ..elf_kernel()
        };
        let p = write_and_read(&guest(64 << 20), &k, None);
        assert_eq!(p.hdr.setup_sects, 27);
        assert_eq!({ p.hdr.init_size }, 0x222_0000);
        assert_eq!({ p.hdr.boot_flag }, 0, "bzImage header copied verbatim");
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    }

    #[test]
    fn initrd_above_4gib_is_rejected() {
        let i = InitrdRange {
            addr: 1 << 32,
            size: 1,
        };
        assert!(build(&elf_kernel(), 1, Some(i), &[]).is_err());
    }
}

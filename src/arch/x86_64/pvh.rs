//! PVH boot: the `hvm_start_info` structure (Xen's start-of-day ABI, which Linux also accepts
//! on KVM) with the command line, the initrd as module and the memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::arch::x86_64::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::memmap::MemoryMapEntry;
use crate::boot::{BootError, InitrdRange};
use crate::memory::GuestMemory;

/// `hvm_start_info` version written: 1 has the memory map fields.
pub const START_INFO_VERSION: u32 = 1;
/// Memory map entries that fit between [`PVH_MEMMAP_START`] and the zero page.
pub const MAX_MEMMAP_ENTRIES: usize =
    (ZERO_PAGE_START - PVH_MEMMAP_START) as usize / std::mem::size_of::<hvm_memmap_table_entry>();

/// Writes `hvm_start_info` at [`PVH_INFO_START`], the initrd module entry at
/// [`PVH_MODLIST_START`] and `memmap` at [`PVH_MEMMAP_START`]; returns the start_info address
/// (the kernel's EBX).
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{layout, memmap, pvh};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 32 << 20)]).unwrap();
/// let addr = pvh::write_start_info(&mem, None, &memmap::memory_map(&mem)).unwrap();
/// assert_eq!(addr, layout::PVH_INFO_START);
/// ```
pub fn write_start_info(
    mem: &GuestMemory,
    initrd: Option<InitrdRange>,
    memmap: &[MemoryMapEntry],
) -> Result<u64, BootError> {
    if memmap.len() > MAX_MEMMAP_ENTRIES {
        return Err(BootError::GuestMemory {
            what: "PVH memory map (too many entries)",
            addr: PVH_MEMMAP_START,
        });
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        write_bytes(mem, module.as_slice(), PVH_MODLIST_START, "PVH module list")?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let table: Vec<u8> = memmap
        .iter()
        .flat_map(|m| {
            hvm_memmap_table_entry {
                addr: m.addr,
                size: m.size,
                type_: m.kind,
                reserved: 0,
            }
            .as_slice()
            .to_vec()
        })
        .collect();
    write_bytes(mem, &table, PVH_MEMMAP_START, "PVH memory map")?;
    write_bytes(mem, info.as_slice(), PVH_INFO_START, "PVH start_info")?;
    Ok(PVH_INFO_START)
}

fn write_bytes(
    mem: &GuestMemory,
    b: &[u8],
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(b, GuestAddress(addr))
        .map_err(|_| BootError::GuestMemory { what, addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memmap::{memory_map, E820_RAM, E820_RESERVED};

    #[test]
    fn start_info_fields() {
        let mem = crate::memory::create(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(&mem);
        let initrd = InitrdRange {
            addr: 0x300_0000,
            size: 0x4321,
        };
        assert_eq!(
            write_start_info(&mem, Some(initrd), &map).unwrap(),
            PVH_INFO_START
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.flags, 0);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(
            (module.paddr, module.size, module.cmdline_paddr),
            (0x300_0000, 0x4321, 0)
        );
        let kinds: Vec<(u64, u32)> = (0..3)
            .map(|i| {
                let e: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(PVH_MEMMAP_START + 24 * i))
                    .unwrap();
                (e.addr, e.type_)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (0, E820_RAM),
                (0x9fc00, E820_RESERVED),
                (0x100000, E820_RAM)
            ]
        );
    }

    #[test]
    fn no_initrd_no_modules() {
        let mem = crate::memory::create(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_start_info(&mem, None, &memory_map(&mem)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn memmap_capacity() {
        assert_eq!(MAX_MEMMAP_ENTRIES, 160);
        let mem = crate::memory::create(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let e = MemoryMapEntry {
            addr: 0,
            size: 1,
            kind: E820_RAM,
        };
        assert!(write_start_info(&mem, None, &vec![e; MAX_MEMMAP_ENTRIES + 1]).is_err());
    }
}

//! The guest's physical memory map as the firmware tables (e820, PVH memmap) report it.

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
use crate::memory::GuestMemory;

/// Usable RAM (e820 type 1; the PVH memmap uses the same numbers).
pub const E820_RAM: u32 = 1;
/// Reserved, not to be used by the OS (e820 type 2).
pub const E820_RESERVED: u32 = 2;

/// One memory map range.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::memmap::{memory_map, E820_RAM, E820_RESERVED};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let map = memory_map(&mem);
/// let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
/// assert!(ram < 64 << 20, "the EBDA/BIOS area is not RAM to the guest");
/// assert!(map.iter().any(|e| e.kind == E820_RESERVED));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for `mem`, sorted by address: guest RAM minus the EBDA/BIOS area
/// `[EBDA_START, 1 MiB)` — reported reserved so the kernel keeps the MP table intact — and
/// minus the MMIO gap, which is simply absent (as in Firecracker), so the kernel sees it as a
/// hole it may hand to devices.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{layout::*, memmap::*};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 128 << 20)]).unwrap();
/// let map = memory_map(&mem);
/// assert_eq!(map[0], MemoryMapEntry { addr: 0, size: EBDA_START, kind: E820_RAM });
/// assert_eq!(map[2], MemoryMapEntry { addr: HIMEM_START, size: (128 << 20) - HIMEM_START, kind: E820_RAM });
/// ```
pub fn memory_map(mem: &GuestMemory) -> Vec<MemoryMapEntry> {
    const HOLES: [(u64, u64); 2] = [(EBDA_START, HIMEM_START), (MMIO_GAP_START, MMIO_GAP_END)];
    let mut map: Vec<MemoryMapEntry> = Vec::new();
    let mut covers_ebda = false;
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start.saturating_add(region.len());
        covers_ebda |= start <= EBDA_START && EBDA_START < end;
        // Subtract the holes (sorted, disjoint) from [start, end).
        let mut pieces = vec![(start, end)];
        for (hs, he) in HOLES {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| [(s, e.min(hs)), (s.max(he), e)])
                .filter(|(s, e)| s < e)
                .collect();
        }
        for (s, e) in pieces {
            match map.last_mut() {
                // Contiguous regions make one range.
                Some(last) if last.kind == E820_RAM && last.addr + last.size == s => {
                    last.size += e - s;
                }
                _ => map.push(MemoryMapEntry {
                    addr: s,
                    size: e - s,
                    kind: E820_RAM,
                }),
            }
        }
    }
    if covers_ebda {
        map.push(MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        });
    }
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::guest_ram_ranges;
    use vm_memory::GuestAddress;

    pub(crate) fn guest(size: u64) -> GuestMemory {
        let ranges: Vec<_> = guest_ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        crate::memory::create(&ranges).unwrap()
    }

    fn e(addr: u64, size: u64, kind: u32) -> MemoryMapEntry {
        MemoryMapEntry { addr, size, kind }
    }

    #[test]
    fn small_guest() {
        let map = memory_map(&guest(128 << 20));
        assert_eq!(
            map,
            [
                e(0, EBDA_START, E820_RAM),
                e(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                e(HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let size = 6u64 << 30;
        let map = memory_map(&guest(size));
        assert_eq!(
            map,
            [
                e(0, EBDA_START, E820_RAM),
                e(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                e(HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM),
                e(MMIO_GAP_END, size - MMIO_GAP_START, E820_RAM),
            ]
        );
        let ram: u64 = map
            .iter()
            .filter(|m| m.kind == E820_RAM)
            .map(|m| m.size)
            .sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn contiguous_regions_merge() {
        let mem =
            crate::memory::create(&[(GuestAddress(0), 4 << 20), (GuestAddress(4 << 20), 4 << 20)])
                .unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[2], e(HIMEM_START, (8 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(map.len(), 3);
    }
}

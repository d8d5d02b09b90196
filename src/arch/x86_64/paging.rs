//! Identity page tables for 64-bit entry: long mode requires paging, so the kernel is entered
//! with the first 1 GiB mapped 1:1 (2 MiB pages), enough for the kernel image, the zero page,
//! the command line and the stack. The kernel builds its own tables right away.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::boot::BootError;
use crate::memory::GuestMemory;

/// Present + writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-size bit: a page-directory entry mapping a 2 MiB page.
const PTE_PS: u64 = 0x80;
/// Entries per table.
const ENTRIES: usize = 512;

/// Writes PML4, PDPT and PD (whole pages, so stale contents cannot leak in) and returns the
/// CR3 value ([`PML4_START`]).
///
/// # Example
/// ```
/// use vm_memory::{Bytes, GuestAddress};
/// use smolvm::arch::x86_64::{layout, paging};
/// let mem = smolvm::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// assert_eq!(paging::setup_identity_map(&mem).unwrap(), layout::PML4_START);
/// let pde: u64 = mem.read_obj(GuestAddress(layout::PDE_START + 8)).unwrap();
/// assert_eq!(pde, (2 << 20) | 0x83);
/// ```
pub fn setup_identity_map(mem: &GuestMemory) -> Result<u64, BootError> {
    let mut pml4 = [0u64; ENTRIES];
    pml4[0] = PDPTE_START | PTE_PRESENT_RW;
    let mut pdpt = [0u64; ENTRIES];
    pdpt[0] = PDE_START | PTE_PRESENT_RW;
    let mut pd = [0u64; ENTRIES];
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PTE_PS | PTE_PRESENT_RW;
    }
    for (what, addr, table) in [
        ("PML4", PML4_START, &pml4),
        ("PDPT", PDPTE_START, &pdpt),
        ("page directory", PDE_START, &pd),
    ] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|_| BootError::GuestMemory { what, addr })?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(mem: &GuestMemory, table: u64, i: u64) -> u64 {
        mem.read_obj(GuestAddress(table + 8 * i)).unwrap()
    }

    #[test]
    fn maps_first_gib_identity() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup_identity_map(&mem).unwrap(), PML4_START);
        assert_eq!(entry(&mem, PML4_START, 0), PDPTE_START | 3);
        assert_eq!(entry(&mem, PML4_START, 1), 0);
        assert_eq!(entry(&mem, PDPTE_START, 0), PDE_START | 3);
        assert_eq!(entry(&mem, PDPTE_START, 1), 0);
        for i in 0..512u64 {
            assert_eq!(entry(&mem, PDE_START, i), (i << 21) | 0x83);
        }
        // Walk an address: 0x2345_6789 -> PD index 0x11a, offset within the 2 MiB page.
        let va = 0x2345_6789u64;
        let pde = entry(&mem, PDE_START, (va >> 21) & 0x1ff);
        assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = crate::memory::create(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(matches!(
            setup_identity_map(&mem),
            Err(BootError::GuestMemory { what: "PML4", .. })
        ));
    }
}

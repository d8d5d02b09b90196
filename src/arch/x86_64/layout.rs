//! The x86_64 guest physical memory map. Every fixed address lives here, so devices, boot
//! code and (later) ACPI tables agree.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  boot GDT             0x0000_0520 boot IDT (empty)
//! 0x0000_6000  PVH start_info, module list and memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer (16 bytes)
//! 0x000a_0000  VGA hole (reserved in e820, as is everything up to 1 MiB)
//! 0x000f_0000  BIOS area: MP configuration table
//! 0x0010_0000  kernel (HIMEM_START)
//! ...          RAM up to min(size, MMIO_GAP_START)
//! 0xc000_0000  MMIO gap: virtio-mmio devices from MMIO_DEVICES_START, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest is larger than the gap start
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (limit 0: any exception before the kernel installs its own is a triple fault).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack (grows down below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the terminating NUL (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area; the MP floating pointer lives here (Linux scans the EBDA's first
/// KiB for it).
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (start of the VGA hole).
pub const LOW_RAM_END: u64 = 0xa0000;
/// MP configuration table, in the BIOS area (reserved in e820 like all of
/// `[EBDA_START, HIMEM_START)`); the floating pointer at [`EBDA_START`] points here.
pub const MPTABLE_CONFIG_START: u64 = 0xf0000;
/// End of the BIOS area the MP configuration table may use.
pub const MPTABLE_CONFIG_END: u64 = HIMEM_START;
/// Where kernels are loaded (1 MiB).
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap: RAM below 4 GiB stops here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address handed to virtio-mmio devices.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) sits just below the LAPIC window, inside the gap.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// KVM's identity-map page (real-mode emulation on older CPUs), just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (GSIs) on the microVM platform.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI free for devices (0-15 are ISA IRQs; virtio devices start above the UARTs).
pub const IRQ_DEVICES_START: u32 = 5;
/// Last GSI available to devices.
pub const IRQ_DEVICES_END: u32 = 23;

/// Guest RAM ranges `(guest address, size)` for `mem_size` bytes of memory: one range below
/// the MMIO gap and, for large guests, the rest above 4 GiB.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::layout::*;
/// let r = guest_ram_ranges(4 << 30);
/// assert_eq!(r.len(), 2);
/// assert_eq!(r[0], (0, MMIO_GAP_START));
/// assert_eq!(r[1], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
/// ```
pub fn guest_ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(guest_ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(guest_ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let r = guest_ram_ranges(MMIO_GAP_START + 4096);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 4096)]);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x10),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x40),
            (PVH_MEMMAP_START, 0xf00),
            (ZERO_PAGE_START, 0x1000),
            (BOOT_STACK_POINTER - 0xff0, 0xff0),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, LOW_RAM_END - EBDA_START),
            (
                MPTABLE_CONFIG_START,
                MPTABLE_CONFIG_END - MPTABLE_CONFIG_START,
            ),
            (HIMEM_START, 1),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}

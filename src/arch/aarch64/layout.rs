//! The aarch64 guest physical memory map. Every fixed address lives here, so the device tree,
//! the GIC set-up, the devices and the boot code agree.
//!
//! ```text
//! 0x0000_0000 .. 0x0800_0000  unmapped (left for boot ROM / flash, as on QEMU `virt`)
//! 0x0800_0000  GICv3 distributor (64 KiB)
//! 0x0801_0000 .. 0x0810_0000  reserved (a GIC ITS, later)
//! 0x0810_0000  GICv3 redistributors: 128 KiB per vCPU, room for MAX_VCPUS (32 MiB)
//! 0x0a10_0000 .. 0x0b00_0000  unused
//! 0x0b00_0000  16550 UART (one 4 KiB page; 1-byte registers)
//! 0x0c00_0000  virtio-mmio windows, 4 KiB each, up to 0x1000_0000
//! 0x1000_0000 .. 0x8000_0000  unused (room for a PCI window later)
//! 0x8000_0000  RAM (2 GiB), one contiguous region of the requested size
//! ```
//!
//! Choices, compared with the public layouts of Firecracker (`arch/src/aarch64/layout.rs`)
//! and QEMU's `virt` board:
//! - RAM starts at 2 GiB like Firecracker's `DRAM_MEM_START`, which leaves the whole first
//!   2 GiB for devices and keeps RAM in one region (no hole to describe). A guest of `n` bytes
//!   ends at `2 GiB + n`: KVM's default 40-bit IPA space therefore holds up to 1022 GiB.
//! - All MMIO sits below 1 GiB, like QEMU `virt` (GIC distributor at 0x0800_0000 there too), so
//!   a 32-bit DMA mask or a 32-bit early console can reach every device.
//! - The redistributor region is sized for [`MAX_VCPUS`] once; the device tree and KVM are
//!   told the part actually used (`vcpus × 128 KiB`), always from the same base.
//! - Interrupts are *SPI numbers counted from 0* (GIC INTID − 32) everywhere in smolvm: in
//!   [`MmioSlot::irq`](crate::devices::virtio::mmio::MmioSlot::irq), in
//!   [`Vm::set_irq_line`](crate::hypervisor::Vm::set_irq_line) and irqfd GSIs (KVM's
//!   default arm64 routing maps GSI `n` to SPI `n`), and in the device tree's
//!   `<GIC_SPI n flags>` specifiers. Only `KVM_IRQ_LINE` needs the INTID (`n + 32`), which
//!   the KVM backend adds.

/// Size of one page of the MMIO map.
const PAGE: u64 = 0x1000;

/// First guest physical address of RAM (2 GiB).
pub const RAM_START: u64 = 0x8000_0000;

/// GICv3 distributor (`GICD_*`) registers.
pub const GIC_DIST_START: u64 = 0x0800_0000;
/// Size of the distributor frame (64 KiB).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// First GICv3 redistributor (`GICR_*`): the RD_base and SGI_base frames of vCPU 0.
pub const GIC_REDIST_START: u64 = 0x0810_0000;
/// Size of one vCPU's redistributor (two 64 KiB frames).
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 0x2_0000;
/// Most vCPUs the redistributor region has room for.
pub const MAX_VCPUS: u32 = 256;
/// End of the space reserved for redistributors.
pub const GIC_REDIST_END: u64 = GIC_REDIST_START + MAX_VCPUS as u64 * GIC_REDIST_SIZE_PER_VCPU;
/// Interrupt ids the GIC implements (`KVM_DEV_ARM_VGIC_GRP_NR_IRQS`): the 32 private ones
/// (SGIs and PPIs) plus 96 SPIs. A multiple of 32, as KVM requires.
pub const GIC_NR_IRQS: u32 = 128;
/// The first shared peripheral interrupt's INTID: SPI `n` is INTID `n + 32`.
pub const GIC_SPI_BASE: u32 = 32;
/// Number of SPIs, `0..GIC_NR_SPIS`.
pub const GIC_NR_SPIS: u32 = GIC_NR_IRQS - GIC_SPI_BASE;

/// GIC maintenance interrupt (PPI 9, INTID 25), described for completeness.
pub const PPI_GIC_MAINTENANCE: u32 = 9;
/// Architected timer PPIs, in the order the `arm,armv8-timer` binding lists them: secure
/// physical (13), non-secure physical (14), virtual (11), hypervisor (10).
pub const PPI_TIMER: [u32; 4] = [13, 14, 11, 10];

/// The 16550 UART's registers (1-byte registers at consecutive addresses).
pub const UART_START: u64 = 0x0b00_0000;
/// Size of the UART window described in the device tree (one page; the UART decodes the
/// first [`UART_REGISTERS`] bytes).
pub const UART_SIZE: u64 = PAGE;
/// Bytes of 16550 registers.
pub const UART_REGISTERS: u64 = 8;
/// The UART's interrupt: SPI 1 (INTID 33), as on QEMU `virt`.
pub const UART_SPI: u32 = 1;
/// The UART's input clock in Hz (the classic 1.8432 MHz crystal: divisor 1 = 115200 baud).
pub const UART_CLOCK_HZ: u32 = 1_843_200;

/// First address handed to virtio-mmio devices.
pub const MMIO_DEVICES_START: u64 = 0x0c00_0000;
/// End (exclusive) of the virtio-mmio window: 16384 windows of 4 KiB, far more than SPIs.
pub const MMIO_DEVICES_END: u64 = 0x1000_0000;
/// First SPI for virtio-mmio devices (SPIs below it are kept for platform devices).
pub const IRQ_DEVICES_START: u32 = 16;
/// Last SPI for virtio-mmio devices: 80 devices.
pub const IRQ_DEVICES_END: u32 = GIC_NR_SPIS - 1;

/// Largest device tree blob Linux accepts (`booting.rst`: at most 2 MiB, 8-byte aligned).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// The kernel image's base alignment (`booting.rst`: a 2 MiB aligned base, plus
/// `text_offset`).
pub const KERNEL_ALIGN: u64 = 0x20_0000;

/// The redistributor range `(start, size)` used by `vcpus` vCPUs.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::layout::*;
/// assert_eq!(gic_redist_range(2), (GIC_REDIST_START, 2 * GIC_REDIST_SIZE_PER_VCPU));
/// ```
pub const fn gic_redist_range(vcpus: u32) -> (u64, u64) {
    (GIC_REDIST_START, vcpus as u64 * GIC_REDIST_SIZE_PER_VCPU)
}

/// Guest RAM ranges `(guest address, size)` for `mem_size` bytes: one range from
/// [`RAM_START`].
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::layout::*;
/// assert_eq!(guest_ram_ranges(256 << 20), vec![(RAM_START, 256 << 20)]);
/// ```
pub fn guest_ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, mem_size)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_areas_do_not_overlap_and_stay_below_ram() {
        let areas = [
            ("gicd", GIC_DIST_START, GIC_DIST_SIZE),
            ("gicr", GIC_REDIST_START, GIC_REDIST_END - GIC_REDIST_START),
            ("uart", UART_START, UART_SIZE),
            (
                "virtio",
                MMIO_DEVICES_START,
                MMIO_DEVICES_END - MMIO_DEVICES_START,
            ),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.1 + a.2 <= 1 << 30, "{} is below 1 GiB", a.0);
            assert!(a.1 + a.2 <= RAM_START);
            assert_eq!(a.1 % PAGE, 0, "{} page aligned", a.0);
            for b in &areas[i + 1..] {
                assert!(
                    a.1 + a.2 <= b.1 || b.1 + b.2 <= a.1,
                    "{} overlaps {}",
                    a.0,
                    b.0
                );
            }
        }
        assert_eq!(GIC_DIST_START % 0x1_0000, 0, "64 KiB aligned distributor");
        assert_eq!(
            GIC_REDIST_START % 0x1_0000,
            0,
            "64 KiB aligned redistributors"
        );
    }

    #[test]
    fn interrupts_are_distinct_and_in_range() {
        const { assert!(GIC_NR_IRQS % 32 == 0) };
        const { assert!(GIC_NR_IRQS >= 64 && GIC_NR_IRQS <= 1020) };
        const { assert!(UART_SPI < IRQ_DEVICES_START) };
        const { assert!(IRQ_DEVICES_START <= IRQ_DEVICES_END) };
        const { assert!(IRQ_DEVICES_END + GIC_SPI_BASE < GIC_NR_IRQS) };
        for ppi in PPI_TIMER.iter().chain([&PPI_GIC_MAINTENANCE]) {
            assert!((*ppi) < 16, "PPIs are 0..16");
        }
    }

    #[test]
    fn redistributors_for_the_largest_guest_fit() {
        let (start, size) = gic_redist_range(MAX_VCPUS);
        assert_eq!(start + size, GIC_REDIST_END);
        const { assert!(GIC_REDIST_END <= UART_START) };
    }

    #[test]
    fn ram_is_one_region_at_2_gib() {
        assert_eq!(guest_ram_ranges(1 << 30), vec![(0x8000_0000, 1 << 30)]);
        assert_eq!(RAM_START % KERNEL_ALIGN, 0);
    }
}

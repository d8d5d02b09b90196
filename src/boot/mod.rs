//! Loading a Linux guest: kernel image (vmlinux ELF with or without the PVH note, bzImage),
//! initrd and kernel command line.
//!
//! Architecture-specific tables (zero page, e820, MP table, page tables) are written by
//! [`crate::arch`]; this module only puts the images into guest memory and reports what it
//! found.

pub mod cmdline;
mod error;
pub mod initrd;
pub mod kernel;

pub use cmdline::KernelCmdline;
pub use error::BootError;
pub use initrd::{load_initrd, InitrdRange};
pub use kernel::{load_kernel, KernelFormat, LoadedKernel};

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::MMIO_GAP_START;
use crate::memory::GuestMemory;

/// End of the RAM that starts at guest address 0 and is usable for images: the first
/// region's end, capped at the MMIO gap. Kernel and initrd must both fit below it (the boot
/// page tables and 32-bit boot fields cannot reach above 4 GiB anyway).
pub(crate) fn low_ram_end(mem: &GuestMemory) -> u64 {
    let mut end = 0u64;
    // Regions are sorted; follow contiguous ones starting at 0.
    while let Some(region) = mem.find_region(GuestAddress(end)) {
        let region_end = region.last_addr().raw_value().saturating_add(1);
        if region_end <= end {
            break;
        }
        end = region_end;
    }
    end.min(MMIO_GAP_START)
}

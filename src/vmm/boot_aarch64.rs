//! The builder's aarch64 boot path: RAM at 2 GiB, the kernel `Image` and initrd, a device
//! tree describing the vCPUs, GICv3, timer, the MMIO 16550 UART and the virtio-mmio devices,
//! and the boot CPU's entry state. The platform decisions live in [`crate::arch::aarch64`];
//! this file only connects them to the [`VmBuilder`] configuration.

use std::sync::{Arc, Mutex};

use crate::arch::aarch64::{self, layout};
use crate::devices::legacy::Serial;
use crate::devices::virtio::mmio::{MmioAllocError, MmioAllocator};
use crate::devices::Bus;
use crate::hypervisor::arch::aarch64::BootState;
use crate::memory::GuestMemory;
use crate::{Error, Result};

use super::config::VmBuilder;

/// The console UART's interrupt: an SPI number, like every device interrupt on arm64.
pub(super) const SERIAL_IRQ: u32 = layout::UART_SPI;

/// The allocator virtio-mmio slots come from: the same one for the transports and the
/// device tree.
pub(super) fn virtio_allocator() -> MmioAllocator {
    MmioAllocator::aarch64()
}

/// Says why `count` virtio devices do not fit.
pub(super) fn virtio_exhausted(e: MmioAllocError) -> String {
    match e {
        MmioAllocError::IrqsExhausted => format!(
            "one interrupt each, SPIs {}-{}",
            layout::IRQ_DEVICES_START,
            layout::IRQ_DEVICES_END
        ),
        MmioAllocError::AddressesExhausted => format!(
            "one 4 KiB window each in {:#x}..{:#x}",
            layout::MMIO_DEVICES_START,
            layout::MMIO_DEVICES_END
        ),
    }
}

/// Guest RAM: one range from [`layout::RAM_START`].
pub(super) fn guest_ram_ranges(size: u64) -> Vec<(u64, u64)> {
    layout::guest_ram_ranges(size)
}

/// Puts the console UART on the MMIO bus (arm64 has no I/O ports).
pub(super) fn insert_serial(mmio: &mut Bus, serial: Arc<Mutex<Serial>>) -> Result<()> {
    mmio.insert(layout::UART_START, layout::UART_REGISTERS, serial)?;
    Ok(())
}

/// Loads the kernel `Image` and initrd and writes the device tree; returns the boot CPU's
/// state.
///
/// The virtio slots are allocated again from [`virtio_allocator`] for the same device count
/// as the builder's transports: the allocator is deterministic, so both see the same
/// addresses and SPIs. The command line is adjusted by [`aarch64::guest_cmdline`].
pub(super) fn load_guest(cfg: &VmBuilder, memory: &GuestMemory) -> Result<BootState> {
    let kernel = cfg
        .kernel
        .as_deref()
        .ok_or_else(|| Error::Config("no kernel: call .kernel(path) with an arm64 Image".into()))?;
    let mut virtio = virtio_allocator();
    #[cfg(target_os = "linux")]
    let vsock_count = usize::from(cfg.vsock.is_some());
    #[cfg(not(target_os = "linux"))]
    let vsock_count = 0;
    for _ in 0..cfg.block_devices.len() + cfg.net_devices.len() + vsock_count {
        virtio
            .allocate()
            .map_err(|e| Error::Config(format!("virtio devices: {}", virtio_exhausted(e))))?;
    }
    let cmdline = aarch64::guest_cmdline(&cfg.cmdline);
    let boot = aarch64::configure_system(
        memory,
        &aarch64::SystemConfig {
            kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cmdline,
            vcpus: cfg.vcpus,
            memory_size: cfg.memory_mib << 20,
            virtio: virtio.slots(),
        },
    )?;
    Ok(boot)
}

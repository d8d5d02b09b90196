//! The aarch64 guest platform: memory map, arm64 `Image` loading, the device tree and the
//! register encodings the boot path needs.
//!
//! Target-independent on purpose: it only computes addresses and writes guest memory, so its
//! unit tests run on any host. The KVM specifics (vCPU init, the GICv3 device) live in the
//! hypervisor backend, which takes the result as a neutral
//! [`BootState`].
//!
//! Boot protocol (Linux `booting.rst`): the boot CPU enters the `Image` at its load address
//! in EL1h with all of `DAIF` masked, the MMU off, `x0` = the device tree's physical address
//! and `x1`-`x3` = 0. The other vCPUs start powered off and are brought up by the guest with
//! PSCI `CPU_ON`, which KVM handles itself.

pub mod fdt;
pub mod image;
pub mod layout;
pub mod regs;

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use crate::boot::{BootError, KernelCmdline};
use crate::devices::virtio::mmio::MmioSlot;
pub use crate::hypervisor::arch::aarch64::BootState;
use crate::memory::GuestMemory;

/// The command line an arm64 guest gets from the builder's `cmdline`: without
/// `virtio_mmio.device=` arguments (the device tree describes the devices; a kernel with
/// `VIRTIO_MMIO_CMDLINE_DEVICES` would otherwise probe each twice), and with an `earlycon`
/// argument for the MMIO 16550 unless the caller set one.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::guest_cmdline;
/// use smolvm::boot::KernelCmdline;
/// let c = guest_cmdline(&KernelCmdline::parse("quiet virtio_mmio.device=4K@0xc000000:16"));
/// assert_eq!(c.to_string(), "quiet earlycon=uart,mmio,0xb000000");
/// ```
pub fn guest_cmdline(cmdline: &KernelCmdline) -> KernelCmdline {
    let mut c = cmdline.clone();
    c.remove("virtio_mmio.device");
    if c.get("earlycon").is_none() {
        c.set("earlycon", &format!("uart,mmio,{:#x}", layout::UART_START));
    }
    c
}

/// What [`configure_system`] needs besides guest memory.
///
/// # Example
/// See [`configure_system`].
#[derive(Debug, Clone, Copy)]
pub struct SystemConfig<'a> {
    /// The kernel `Image`.
    pub kernel: &'a Path,
    /// The initrd, if any.
    pub initrd: Option<&'a Path>,
    /// The kernel command line (`/chosen/bootargs`).
    pub cmdline: &'a KernelCmdline,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM size in bytes (RAM starts at [`layout::RAM_START`]).
    pub memory_size: u64,
    /// The virtio-mmio devices' slots, from the same allocation as their transports.
    pub virtio: &'a [MmioSlot],
}

/// Loads the kernel and initrd, writes the device tree, and returns the boot CPU's state.
///
/// # Errors
/// [`BootError`]: unreadable or unrecognised files, too little memory, a device tree that
/// cannot be built (a NUL in the command line), or a vCPU count the GIC layout has no room
/// for.
///
/// # Example
/// ```no_run
/// use smolvm::arch::aarch64::{configure_system, layout, SystemConfig};
/// use smolvm::boot::KernelCmdline;
/// let size = 256u64 << 20;
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(layout::RAM_START), size as usize)])?;
/// let boot = configure_system(&mem, &SystemConfig {
///     kernel: "Image".as_ref(),
///     initrd: None,
///     cmdline: &KernelCmdline::parse("console=ttyS0"),
///     vcpus: 2,
///     memory_size: size,
///     virtio: &[],
/// })?;
/// println!("enter at {:#x} with the device tree at {:#x}", boot.pc, boot.x0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn configure_system(
    mem: &GuestMemory,
    config: &SystemConfig<'_>,
) -> Result<BootState, BootError> {
    if config.vcpus == 0 || config.vcpus > layout::MAX_VCPUS {
        return Err(BootError::TooManyArm64Vcpus(config.vcpus));
    }
    let loaded = image::load(
        mem,
        layout::RAM_START,
        config.memory_size,
        config.kernel,
        config.initrd,
    )?;
    let mpidrs: Vec<u64> = (0..config.vcpus).map(regs::vcpu_mpidr).collect();
    let cmdline = config.cmdline.to_string();
    let blob = fdt::create_fdt(&fdt::DeviceTreeConfig {
        mpidrs: &mpidrs,
        memory: &layout::guest_ram_ranges(config.memory_size),
        cmdline: &cmdline,
        initrd: loaded.initrd,
        virtio: config.virtio,
    })?;
    let fdt_addr = loaded.placement.fdt_start;
    mem.write_slice(&blob, GuestAddress(fdt_addr))
        .map_err(|_| BootError::GuestMemory {
            what: "device tree",
            addr: fdt_addr,
        })?;
    Ok(BootState {
        pc: loaded.placement.kernel_start,
        x0: fdt_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::MmioAllocator;

    #[test]
    fn guest_cmdline_keeps_a_callers_earlycon() {
        let c = guest_cmdline(&KernelCmdline::parse("earlycon console=ttyS0"));
        assert_eq!(c.to_string(), "earlycon console=ttyS0");
        let c = guest_cmdline(&KernelCmdline::parse(
            "virtio_mmio.device=4K@0xc000000:16 virtio_mmio.device=4K@0xc001000:17 init=/x",
        ));
        assert_eq!(c.to_string(), "init=/x earlycon=uart,mmio,0xb000000");
    }

    #[test]
    fn boots_with_the_device_tree_in_x0() {
        let dir = std::env::temp_dir().join(format!("smolvm-a64sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("Image");
        let mut h = vec![0u8; 0x1000];
        h[16..24].copy_from_slice(&(4u64 << 20).to_le_bytes());
        h[0x38..0x3c].copy_from_slice(b"ARM\x64");
        std::fs::write(&kernel, &h).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, [7u8; 100]).unwrap();
        let size = 64u64 << 20;
        let mem =
            crate::memory::create(&[(GuestAddress(layout::RAM_START), size as usize)]).unwrap();
        let mut virtio = MmioAllocator::aarch64();
        virtio.allocate().unwrap();
        let cmdline = KernelCmdline::parse("console=ttyS0");
        let config = SystemConfig {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            vcpus: 2,
            memory_size: size,
            virtio: virtio.slots(),
        };
        let boot = configure_system(&mem, &config).unwrap();
        assert_eq!(boot.pc, layout::RAM_START);
        assert_eq!(boot.x0, layout::RAM_START + (62 << 20));
        let mut blob = vec![0u8; 4096];
        mem.read_slice(&mut blob, GuestAddress(boot.x0)).unwrap();
        let len = u32::from_be_bytes([blob[4], blob[5], blob[6], blob[7]]) as usize;
        let mut blob = vec![0u8; len];
        mem.read_slice(&mut blob, GuestAddress(boot.x0)).unwrap();
        let root = fdt::parse(&blob).unwrap();
        let chosen = root.find("/chosen").unwrap();
        assert_eq!(chosen.string("bootargs"), Some("console=ttyS0"));
        let start = chosen.u64s("linux,initrd-start").unwrap()[0];
        assert_eq!(chosen.u64s("linux,initrd-end").unwrap()[0], start + 100);
        assert_eq!(root.find("/cpus").unwrap().children.len(), 2);
        assert!(root.find("/virtio_mmio@c000000").is_some());

        let too_many = SystemConfig {
            vcpus: layout::MAX_VCPUS + 1,
            ..config
        };
        assert!(matches!(
            configure_system(&mem, &too_many),
            Err(BootError::TooManyArm64Vcpus(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

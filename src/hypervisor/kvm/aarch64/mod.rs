//! aarch64 specifics of the KVM backend: vCPU init (`KVM_ARM_VCPU_INIT` with PSCI 0.2),
//! the in-kernel GICv3 (`KVM_CREATE_DEVICE`), boot registers through `KVM_SET_ONE_REG`, and
//! SPI injection.
//!
//! The numbers (register ids, the `KVM_IRQ_LINE` encoding, the memory map) come from the
//! target-independent [`crate::arch::aarch64`], where they are unit-tested.

use kvm_bindings::{kvm_create_device, kvm_device_attr, kvm_vcpu_init};
use kvm_ioctls::{DeviceFd, VcpuFd, VmFd};

use super::err;
use crate::arch::aarch64::{layout, regs};
use crate::hypervisor::arch::aarch64::BootState;
use crate::hypervisor::{CpuConfig, HypervisorError, Result};

/// The host's preferred vCPU target (`KVM_ARM_PREFERRED_TARGET`), asked once per VM.
pub fn preferred_target(vm: &VmFd) -> Result<kvm_vcpu_init> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(err("KVM_ARM_PREFERRED_TARGET"))?;
    Ok(kvi)
}

/// `KVM_ARM_VCPU_INIT` with PSCI 0.2; every vCPU but the boot CPU (id 0) starts powered off
/// and waits for the guest's PSCI `CPU_ON`, which KVM handles. Then checks that KVM gave the
/// vCPU the MPIDR the device tree describes ([`regs::vcpu_mpidr`]).
pub fn init_vcpu(fd: &VcpuFd, target: &kvm_vcpu_init, config: &CpuConfig) -> Result<()> {
    let mut kvi = *target;
    kvi.features[0] |= 1 << kvm_bindings::KVM_ARM_VCPU_PSCI_0_2;
    if config.id != 0 {
        kvi.features[0] |= 1 << kvm_bindings::KVM_ARM_VCPU_POWER_OFF;
    }
    fd.vcpu_init(&kvi).map_err(err("KVM_ARM_VCPU_INIT"))?;
    let mpidr = get_reg(fd, regs::MPIDR_EL1, "KVM_GET_ONE_REG(MPIDR_EL1)")?;
    let expected = regs::vcpu_mpidr(config.id);
    if mpidr & regs::MPIDR_AFFINITY_MASK != expected & regs::MPIDR_AFFINITY_MASK {
        return Err(HypervisorError::InvalidArgument(format!(
            "KVM gave vCPU {} MPIDR {mpidr:#x}, but the device tree describes {expected:#x}",
            config.id
        )));
    }
    Ok(())
}

fn get_reg(fd: &VcpuFd, id: u64, op: &'static str) -> Result<u64> {
    let mut bytes = [0u8; 8];
    fd.get_one_reg(id, &mut bytes).map_err(err(op))?;
    Ok(u64::from_ne_bytes(bytes))
}

fn set_reg(fd: &VcpuFd, id: u64, value: u64, op: &'static str) -> Result<()> {
    fd.set_one_reg(id, &value.to_ne_bytes()).map_err(err(op))?;
    Ok(())
}

/// The boot CPU's entry state: `PC`, `x0` = the device tree, `x1`-`x3` = 0, `PSTATE` = EL1h
/// with `DAIF` masked.
pub fn set_boot_state(fd: &VcpuFd, state: &BootState) -> Result<()> {
    set_reg(
        fd,
        regs::PSTATE,
        regs::PSTATE_BOOT,
        "KVM_SET_ONE_REG(PSTATE)",
    )?;
    set_reg(fd, regs::PC, state.pc, "KVM_SET_ONE_REG(PC)")?;
    for (n, value) in [(0u8, state.x0), (1, 0), (2, 0), (3, 0)] {
        let id = regs::xreg_id(n).ok_or(HypervisorError::InvalidArgument(format!("x{n}")))?;
        set_reg(fd, id, value, "KVM_SET_ONE_REG(x0-x3)")?;
    }
    Ok(())
}

fn set_attr(gic: &DeviceFd, group: u32, attr: u64, addr: u64, op: &'static str) -> Result<()> {
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr,
    };
    gic.set_device_attr(&a).map_err(err(op))
}

/// Creates the in-kernel GICv3 for the vCPUs that exist now: distributor and redistributors
/// at the [layout](crate::arch::aarch64::layout) addresses, [`layout::GIC_NR_IRQS`]
/// interrupts, then `KVM_DEV_ARM_VGIC_CTRL_INIT`. The returned fd keeps the device.
pub fn create_gic(vm: &VmFd) -> Result<DeviceFd> {
    let mut dev = kvm_create_device {
        type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm.create_device(&mut dev).map_err(|e| {
        if e.errno() == libc::ENODEV {
            HypervisorError::MissingCapability(
                "KVM_DEV_TYPE_ARM_VGIC_V3 (the host's GIC cannot run a virtual GICv3)",
            )
        } else {
            err("KVM_CREATE_DEVICE(ARM_VGIC_V3)")(e)
        }
    })?;
    let nr_irqs: u32 = layout::GIC_NR_IRQS;
    let dist: u64 = layout::GIC_DIST_START;
    let redist: u64 = layout::GIC_REDIST_START;
    // The kernel reads each value through the pointer during the ioctl; the locals outlive it.
    set_attr(
        &gic,
        kvm_bindings::KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        std::ptr::addr_of!(nr_irqs) as u64,
        "KVM_SET_DEVICE_ATTR(VGIC NR_IRQS)",
    )?;
    set_attr(
        &gic,
        kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(kvm_bindings::KVM_VGIC_V3_ADDR_TYPE_DIST),
        std::ptr::addr_of!(dist) as u64,
        "KVM_SET_DEVICE_ATTR(VGIC distributor address)",
    )?;
    set_attr(
        &gic,
        kvm_bindings::KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(kvm_bindings::KVM_VGIC_V3_ADDR_TYPE_REDIST),
        std::ptr::addr_of!(redist) as u64,
        "KVM_SET_DEVICE_ATTR(VGIC redistributor address)",
    )?;
    set_attr(
        &gic,
        kvm_bindings::KVM_DEV_ARM_VGIC_GRP_CTRL,
        u64::from(kvm_bindings::KVM_DEV_ARM_VGIC_CTRL_INIT),
        0,
        "KVM_SET_DEVICE_ATTR(VGIC CTRL_INIT)",
    )?;
    Ok(gic)
}

/// `KVM_IRQ_LINE` for SPI `spi` (counted from 0).
pub fn set_spi_line(vm: &VmFd, spi: u32, level: bool) -> Result<()> {
    let irq = regs::kvm_irq_line_spi(spi)
        .filter(|_| spi < layout::GIC_NR_SPIS)
        .ok_or_else(|| {
            HypervisorError::InvalidArgument(format!(
                "SPI {spi} is beyond the GIC's {} SPIs",
                layout::GIC_NR_SPIS
            ))
        })?;
    vm.set_irq_line(irq, level).map_err(err("KVM_IRQ_LINE"))
}

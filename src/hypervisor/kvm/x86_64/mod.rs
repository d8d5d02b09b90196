//! x86_64 specifics of the KVM backend: CPUID, MSRs, FPU, LAPIC and register conversions.

mod cpuid;
mod regs;

pub use cpuid::add_emulated_features;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::err;
use crate::hypervisor::arch::x86_64::BootState;
use crate::hypervisor::{CpuConfig, HypervisorError, Result};

pub use regs::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm};

/// CPUID, MSRs, FPU and LAPIC LINT pins for one vCPU.
pub fn configure_cpu(fd: &VcpuFd, supported: &CpuId, config: &CpuConfig) -> Result<()> {
    let mut cpuid = supported.clone();
    cpuid::adjust(cpuid.as_mut_slice(), config.id, config.count);
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    set_boot_msrs(fd)?;
    // x87 control word after FNINIT and the SSE default MXCSR: what firmware leaves behind.
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
    set_lint(fd)
}

/// MSR numbers used at boot.
mod msr {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_MISC_ENABLE bit 0: fast string operations.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
    pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
}

fn set_boot_msrs(fd: &VcpuFd) -> Result<()> {
    let entries = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
        (msr::MTRR_DEF_TYPE, msr::MTRR_ENABLE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| HypervisorError::InvalidArgument("too many boot MSRs".into()))?;
    let written = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        // KVM stops at the first MSR it rejects.
        return Err(HypervisorError::InvalidArgument(format!(
            "KVM rejected boot MSR {:#x}",
            entries[written].index
        )));
    }
    Ok(())
}

/// LAPIC LVT0 = ExtINT (the PIC's output) and LVT1 = NMI, as the MP specification's virtual
/// wire mode expects and Linux assumes before it programs the APIC itself.
fn set_lint(fd: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 4;
    const MODE_EXTINT: u32 = 7;
    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let reg = &mut lapic.regs[off..off + 4];
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(reg.iter()) {
            *b = *r as u8;
        }
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (r, b) in reg.iter_mut().zip(v.to_le_bytes()) {
            *r = b as _;
        }
    }
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))
}

/// Applies a boot register state over the vCPU's reset state.
pub fn set_boot_state(fd: &VcpuFd, state: &BootState) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs_to_kvm(&state.sregs, &mut sregs);
    fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs_to_kvm(&state.regs))
        .map_err(err("KVM_SET_REGS"))
}

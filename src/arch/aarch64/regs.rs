//! arm64 register encodings: KVM `ONE_REG` ids, the boot `PSTATE` and the MPIDR assignment.
//!
//! Plain `const fn` arithmetic, compiled on every host so that it is unit-tested on x86_64 as
//! well. The ids follow the KVM API documentation (`Documentation/virt/kvm/api.rst`, "ARM64
//! registers") and `arch/arm64/include/uapi/asm/kvm.h`:
//!
//! ```text
//! bits 63..56  architecture  0x60 = KVM_REG_ARM64
//! bits 55..52  size          0x3  = KVM_REG_SIZE_U64 (log2 of the size in bytes)
//! bits 31..16  group         0x0010 = KVM_REG_ARM_CORE, 0x0013 = KVM_REG_ARM64_SYSREG
//! bits 15..0   index         core: offset into struct kvm_regs / 4;
//!                            sysreg: op0 << 14 | op1 << 11 | CRn << 7 | CRm << 3 | op2
//! ```

/// `KVM_REG_ARM64`: the architecture field of every arm64 register id.
pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// `KVM_REG_SIZE_U64`: the size field of a 64-bit register.
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
/// `KVM_REG_ARM_CORE`: the group of the registers in `struct kvm_regs`.
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
/// `KVM_REG_ARM64_SYSREG`: the group of the system registers.
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// Byte offsets in `struct kvm_regs` (which starts with `struct user_pt_regs`:
/// `regs[31]`, `sp`, `pc`, `pstate`, all `u64`).
const OFFSET_SP: u64 = 31 * 8;
const OFFSET_PC: u64 = 32 * 8;
const OFFSET_PSTATE: u64 = 33 * 8;

/// The id of the 64-bit core register at byte `offset` of `struct kvm_regs`.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::{core_reg_id, PC};
/// assert_eq!(core_reg_id(256), PC);
/// ```
pub const fn core_reg_id(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / 4)
}

/// The id of general purpose register `x<n>`, `n` in `0..=30`; `None` otherwise (x31 is
/// `sp` or `xzr` depending on the instruction: use [`SP`]).
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::xreg_id;
/// assert_eq!(xreg_id(0), Some(0x6030_0000_0010_0000));
/// assert_eq!(xreg_id(1), Some(0x6030_0000_0010_0002));
/// assert_eq!(xreg_id(31), None);
/// ```
pub const fn xreg_id(n: u8) -> Option<u64> {
    if n <= 30 {
        Some(core_reg_id(n as u64 * 8))
    } else {
        None
    }
}

/// The stack pointer of the user register set (`SP_EL0`; the kernel's own stack is `SP_EL1`).
pub const SP: u64 = core_reg_id(OFFSET_SP);
/// The program counter.
pub const PC: u64 = core_reg_id(OFFSET_PC);
/// `PSTATE` (exception level, stack selection, `DAIF` masks, condition flags).
pub const PSTATE: u64 = core_reg_id(OFFSET_PSTATE);

/// The id of system register `S<op0>_<op1>_C<crn>_C<crm>_<op2>` (KVM's `ARM64_SYS_REG`).
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::{sys_reg_id, MPIDR_EL1};
/// assert_eq!(sys_reg_id(3, 0, 0, 0, 5), MPIDR_EL1);
/// ```
pub const fn sys_reg_id(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | ((op0 as u64 & 0x3) << 14)
        | ((op1 as u64 & 0x7) << 11)
        | ((crn as u64 & 0xf) << 7)
        | ((crm as u64 & 0xf) << 3)
        | (op2 as u64 & 0x7)
}

/// `MPIDR_EL1`, the multiprocessor affinity register (`S3_0_C0_C0_5`).
pub const MPIDR_EL1: u64 = sys_reg_id(3, 0, 0, 0, 5);

/// `PSTATE` at kernel entry, as Linux's `booting.rst` requires: EL1 using `SP_EL1` (`EL1h`,
/// mode 0b0101) with all of `D`, `A`, `I` and `F` masked (bits 9..6).
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::PSTATE_BOOT;
/// assert_eq!(PSTATE_BOOT & 0xf, 0b0101, "EL1h");
/// assert_eq!(PSTATE_BOOT >> 6 & 0xf, 0xf, "DAIF masked");
/// ```
pub const PSTATE_BOOT: u64 = PSR_MODE_EL1H | PSR_D | PSR_A | PSR_I | PSR_F;
const PSR_MODE_EL1H: u64 = 0x5;
const PSR_F: u64 = 1 << 6;
const PSR_I: u64 = 1 << 7;
const PSR_A: u64 = 1 << 8;
const PSR_D: u64 = 1 << 9;

/// The affinity fields of an MPIDR (Aff3 in bits 39..32, Aff2..Aff0 in bits 23..0): what a
/// device tree `cpu` node's `reg` holds.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The `MPIDR_EL1` of vCPU `index`: what KVM gives a vCPU at reset (`reset_mpidr` in
/// `arch/arm64/kvm/sys_regs.c`: 16 CPUs per cluster in Aff0, so that GICv3 SGI target lists
/// reach them all, then Aff1 and Aff2; bit 31 is RES1). The device tree describes the CPUs
/// with these values; backends where the VMM sets the MPIDR itself use the same ones.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::{vcpu_mpidr, MPIDR_AFFINITY_MASK};
/// assert_eq!(vcpu_mpidr(0), 0x8000_0000);
/// assert_eq!(vcpu_mpidr(17) & MPIDR_AFFINITY_MASK, 0x101, "Aff1 = 1, Aff0 = 1");
/// ```
pub const fn vcpu_mpidr(index: u32) -> u64 {
    let i = index as u64;
    (1 << 31) | (i & 0xf) | (((i >> 4) & 0xff) << 8) | (((i >> 12) & 0xff) << 16)
}

/// `KVM_ARM_IRQ_TYPE_SPI`, in bits 27..24 of `KVM_IRQ_LINE`'s `irq` field.
const KVM_ARM_IRQ_TYPE_SPI: u32 = 1;
const KVM_ARM_IRQ_TYPE_SHIFT: u32 = 24;
/// Interrupt ids are 10 bits in `KVM_IRQ_LINE`'s encoding; SPIs end at INTID 1019.
const MAX_SPI_INTID: u32 = 1019;

/// The `irq` field of `KVM_IRQ_LINE` for shared peripheral interrupt `spi` (counted from 0):
/// `KVM_ARM_IRQ_TYPE_SPI << 24 | INTID`, with INTID = `spi + 32` (KVM API documentation,
/// `KVM_IRQ_LINE`, "ARM/arm64"). `None` beyond the GIC's last SPI.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::regs::kvm_irq_line_spi;
/// assert_eq!(kvm_irq_line_spi(0), Some(0x0100_0020)); // INTID 32
/// assert_eq!(kvm_irq_line_spi(5000), None);
/// ```
pub const fn kvm_irq_line_spi(spi: u32) -> Option<u32> {
    if spi > MAX_SPI_INTID - 32 {
        return None;
    }
    Some((KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (spi + 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kvm_headers() {
        // Values as QEMU/kvmtool/Firecracker compute them from KVM_REG_ARM_CORE_REG().
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(SP, 0x6030_0000_0010_003e);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(xreg_id(0), Some(0x6030_0000_0010_0000));
        assert_eq!(xreg_id(30), Some(0x6030_0000_0010_003c));
        assert_eq!(xreg_id(31), None);
        assert_eq!(KVM_REG_ARM_CORE, u64::from(0x0010_0000u32));
        assert_eq!(KVM_REG_ARM64_SYSREG, u64::from(0x0013_0000u32));
    }

    #[test]
    fn system_register_ids_match_the_kvm_headers() {
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
        // SCTLR_EL1 = S3_0_C1_C0_0; KVM_REG_ARM_TIMER_CNT = ARM64_SYS_REG(3, 3, 14, 3, 2).
        assert_eq!(sys_reg_id(3, 0, 1, 0, 0), 0x6030_0000_0013_c080);
        assert_eq!(sys_reg_id(3, 3, 14, 3, 2), 0x6030_0000_0013_df1a);
    }

    #[test]
    fn irq_line_encoding_matches_the_kvm_api() {
        // type (bits 27..24) = 1 (SPI), vcpu_index (23..16) = 0, irq_id (15..0) = INTID.
        assert_eq!(kvm_irq_line_spi(0), Some(0x0100_0020));
        assert_eq!(kvm_irq_line_spi(16), Some(0x0100_0030));
        assert_eq!(kvm_irq_line_spi(987), Some(0x0100_03fb));
        assert_eq!(kvm_irq_line_spi(988), None);
        assert_eq!(kvm_irq_line_spi(u32::MAX), None);
    }

    #[test]
    fn boot_pstate_is_el1h_with_daif_masked() {
        assert_eq!(PSTATE_BOOT, 0x3c5);
    }

    #[test]
    fn mpidr_follows_kvm_reset_values() {
        assert_eq!(vcpu_mpidr(0), 0x8000_0000);
        assert_eq!(vcpu_mpidr(15) & MPIDR_AFFINITY_MASK, 0xf);
        assert_eq!(vcpu_mpidr(16) & MPIDR_AFFINITY_MASK, 0x100);
        assert_eq!(vcpu_mpidr(255) & MPIDR_AFFINITY_MASK, 0xf0f);
        assert_eq!(vcpu_mpidr(4096) & MPIDR_AFFINITY_MASK, 0x1_0000);
        let all: std::collections::HashSet<u64> = (0..512).map(vcpu_mpidr).collect();
        assert_eq!(all.len(), 512, "distinct");
    }
}

//! aarch64 register state in backend-neutral form.

/// The boot CPU's registers at kernel entry (Linux `booting.rst`).
///
/// Backends also set `PSTATE` to [`PSTATE_BOOT`](crate::arch::aarch64::regs::PSTATE_BOOT)
/// (EL1h, `DAIF` masked) and `x1`-`x3` to 0; the other vCPUs get no boot state: they start
/// powered off and the guest starts them with PSCI `CPU_ON`.
///
/// # Example
/// ```
/// use smolvm::hypervisor::arch::aarch64::BootState;
/// let boot = BootState { pc: 0x8000_0000, x0: 0x8fe0_0000 };
/// assert_eq!(boot.x0 % 8, 0, "the device tree is 8-byte aligned");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootState {
    /// Entry point: the kernel `Image`'s load address.
    pub pc: u64,
    /// Physical address of the device tree blob.
    pub x0: u64,
}

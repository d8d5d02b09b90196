//! Why a VM stopped.

use std::fmt;

use crate::hypervisor::ExitFailure;

/// Why a VM stopped running. Returned by [`VmHandle::wait`](super::VmHandle::wait) and
/// [`VmHandle::stop`](super::VmHandle::stop).
///
/// # Example
/// ```no_run
/// use smolvm::{ExitReason, VmBuilder};
/// let vm = VmBuilder::new().kernel("vmlinux").start()?;
/// let code = match vm.wait() {
///     ExitReason::PowerOff | ExitReason::Reset => 0,
///     ExitReason::TripleFault { vcpu } => { eprintln!("vCPU {vcpu} crashed"); 2 }
///     other => { eprintln!("{other}"); 1 }
/// };
/// if code != 0 {
///     std::process::exit(code);
/// }
/// # Ok::<(), smolvm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 reset line, PSCI SYSTEM_RESET). Linux `reboot`
    /// with `reboot=k`, and a Linux panic with `panic=1`, end here.
    Reset,
    /// The guest asked to be powered off (ACPI PM1a SLP_EN, PSCI SYSTEM_OFF).
    PowerOff,
    /// Every vCPU halted with interrupts disabled (`cli; hlt`): nothing can wake the guest.
    Halted,
    /// A vCPU triple-faulted (x86 shutdown): the guest crashed too early or too badly to
    /// report it.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
    },
    /// [`VmHandle::stop`](super::VmHandle::stop) stopped it.
    Stopped,
    /// The hypervisor could not continue the guest (e.g. an instruction it cannot emulate).
    GuestFailure {
        /// The vCPU that failed.
        vcpu: u32,
        /// What the backend reported.
        failure: ExitFailure,
    },
    /// The VMM failed (a hypervisor call returned an error).
    VmmError {
        /// The vCPU whose thread hit the error, if any.
        vcpu: Option<u32>,
        /// The error, rendered.
        message: String,
    },
}

impl ExitReason {
    /// Whether the guest itself ended the run cleanly (reset, power-off or final halt).
    ///
    /// # Example
    /// ```
    /// use smolvm::ExitReason;
    /// assert!(ExitReason::PowerOff.is_guest_shutdown());
    /// assert!(ExitReason::Halted.is_guest_shutdown());
    /// assert!(!ExitReason::Stopped.is_guest_shutdown());
    /// assert!(!ExitReason::TripleFault { vcpu: 0 }.is_guest_shutdown());
    /// ```
    pub fn is_guest_shutdown(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Halted
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Reset => f.write_str("guest reset"),
            ExitReason::PowerOff => f.write_str("guest powered off"),
            ExitReason::Halted => f.write_str("guest halted with interrupts disabled"),
            ExitReason::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
            ExitReason::GuestFailure { vcpu, failure } => {
                write!(f, "vCPU {vcpu} failed: {failure}")
            }
            ExitReason::VmmError {
                vcpu: Some(v),
                message,
            } => write!(f, "VMM error on vCPU {v}: {message}"),
            ExitReason::VmmError {
                vcpu: None,
                message,
            } => write!(f, "VMM error: {message}"),
        }
    }
}

//! The backend-neutral reason a vCPU stopped running guest code.

use std::fmt;

/// Why [`Vcpu::run`](super::Vcpu::run) returned.
///
/// Data buffers borrow the backend's exit area: fill `IoIn`/`MmioRead` buffers before the next
/// `run`, which completes the guest's load.
///
/// # Example
/// ```
/// use smolvm::devices::Bus;
/// use smolvm::hypervisor::VmExit;
/// /// Hands an exit to the port/MMIO buses; `false` when the vCPU cannot go on.
/// fn dispatch(exit: VmExit<'_>, pio: &Bus, mmio: &Bus) -> bool {
///     match exit {
///         VmExit::IoIn { port, data, .. } => pio.read(port.into(), data),
///         VmExit::IoOut { port, data, .. } => pio.write(port.into(), data),
///         VmExit::MmioRead { addr, data } => mmio.read(addr, data),
///         VmExit::MmioWrite { addr, data } => mmio.write(addr, data),
///         VmExit::Interrupted => true,
///         _ => return false,
///     };
///     true
/// }
/// let (pio, mmio) = (Bus::new("pio"), Bus::new("mmio"));
/// let mut data = [0u8; 1];
/// assert!(dispatch(VmExit::IoIn { port: 0x80, size: 1, data: &mut data }, &pio, &mmio));
/// assert_eq!(data, [0xff], "nothing at port 0x80");
/// assert!(!dispatch(VmExit::Shutdown, &pio, &mmio));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum VmExit<'a> {
    /// x86 `in` from `port`; `data.len()` is the access size times the repeat count
    /// (`rep ins` may be reported as one exit).
    IoIn {
        /// The I/O port.
        port: u16,
        /// Bytes per access (1, 2 or 4); `data` holds `data.len() / size` accesses.
        size: usize,
        /// Where to put the value the guest reads.
        data: &'a mut [u8],
    },
    /// x86 `out` to `port` (`rep outs` may be reported as one exit).
    IoOut {
        /// The I/O port.
        port: u16,
        /// Bytes per access (1, 2 or 4); `data` holds `data.len() / size` accesses.
        size: usize,
        /// The bytes written.
        data: &'a [u8],
    },
    /// A guest load from an address with no memory behind it.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Where to put the value the guest reads (1, 2, 4 or 8 bytes).
        data: &'a mut [u8],
    },
    /// A guest store to an address with no memory behind it.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// The bytes stored.
        data: &'a [u8],
    },
    /// The vCPU halted and the backend handed the wait to the VMM (KVM without an in-kernel
    /// LAPIC). Backends that wait in the kernel (KVM with irqchip, HVF) never return it.
    Halt,
    /// x86 split irqchip ([`IrqchipMode::Split`](super::IrqchipMode::Split)): the guest
    /// signalled end-of-interrupt to its LAPIC for `vector`, which a level-triggered route of
    /// the userspace IOAPIC delivered. Hand it to the IOAPIC
    /// ([`Ioapic::end_of_interrupt`](crate::devices::legacy::Ioapic::end_of_interrupt)) so it
    /// clears remote IRR and re-delivers a still-asserted line. Never returned otherwise.
    IoapicEoi {
        /// The vector the guest acknowledged.
        vector: u8,
    },
    /// x86 triple fault (KVM_EXIT_SHUTDOWN): the guest cannot continue.
    Shutdown,
    /// The guest asked the platform to power off (PSCI SYSTEM_OFF, KVM system event).
    PowerOff,
    /// The guest asked the platform to reset (PSCI SYSTEM_RESET, KVM system event).
    Reset,
    /// Another thread kicked the vCPU ([`VcpuKick`](super::VcpuKick)) or a signal arrived.
    Interrupted,
    /// The hypervisor could not continue the guest.
    Failure(ExitFailure),
}

/// What the backend knows about a failure to run the guest.
///
/// # Example
/// ```
/// use smolvm::hypervisor::ExitFailure;
/// let f = ExitFailure {
///     reason: "KVM_EXIT_INTERNAL_ERROR".into(),
///     suberror: Some(1),
///     pc: Some(0x1000),
///     ..Default::default()
/// };
/// assert_eq!(
///     f.to_string(),
///     "KVM_EXIT_INTERNAL_ERROR (suberror 1: instruction emulation failed) at pc 0x1000"
/// );
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitFailure {
    /// The backend's name for the failure (e.g. `KVM_EXIT_INTERNAL_ERROR`).
    pub reason: String,
    /// Backend sub-code (KVM internal-error suberror: 1 = emulation failure).
    pub suberror: Option<u32>,
    /// Bytes of the instruction that could not be run, when known.
    pub instruction: Vec<u8>,
    /// Guest instruction pointer, when known.
    pub pc: Option<u64>,
    /// Further backend data words (KVM internal error `data[]`).
    pub data: Vec<u64>,
}

impl fmt::Display for ExitFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(s) = self.suberror {
            write!(f, " (suberror {s}")?;
            if s == 1 {
                f.write_str(": instruction emulation failed")?;
            }
            f.write_str(")")?;
        }
        if let Some(pc) = self.pc {
            write!(f, " at pc {pc:#x}")?;
        }
        if !self.instruction.is_empty() {
            f.write_str(", instruction bytes")?;
            for b in &self.instruction {
                write!(f, " {b:02x}")?;
            }
        }
        if !self.data.is_empty() {
            write!(f, ", data {:x?}", self.data)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_display_names_emulation_and_bytes() {
        let f = ExitFailure {
            reason: "KVM_EXIT_INTERNAL_ERROR".into(),
            suberror: Some(1),
            instruction: vec![0x0f, 0xc7, 0x0e],
            pc: Some(0x1000),
            data: vec![],
        };
        let s = f.to_string();
        assert!(s.contains("instruction emulation failed"), "{s}");
        assert!(s.contains("0f c7 0e"), "{s}");
        assert!(s.contains("0x1000"), "{s}");
    }
}

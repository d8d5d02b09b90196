//! Edge-triggered interrupt lines for devices.
//!
//! Where the backend has irqfd, raising the line is one `write(2)` to an eventfd and the
//! hypervisor injects the interrupt without a VM ioctl; otherwise the line is pulsed through
//! [`Vm::set_irq_line`].

use std::sync::Arc;

use crate::hypervisor::{HypervisorError, Vm};

#[cfg(target_os = "linux")]
use crate::hypervisor::EventFd;

/// One guest interrupt line (a GSI) a device can raise.
///
/// # Example
/// ```no_run
/// use smolvm::devices::InterruptLine;
/// use smolvm::hypervisor::IrqchipMode;
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(IrqchipMode::InKernel)?;
/// let com1 = InterruptLine::new(&vm, 4)?; // an irqfd on KVM
/// assert_eq!(com1.gsi(), 4);
/// com1.trigger()?; // one edge on ISA IRQ 4
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct InterruptLine {
    gsi: u32,
    kind: Kind,
}

enum Kind {
    #[cfg(target_os = "linux")]
    Irqfd {
        fd: EventFd,
        vm: Arc<dyn Vm>,
    },
    Ioctl(Arc<dyn Vm>),
}

impl std::fmt::Debug for InterruptLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            #[cfg(target_os = "linux")]
            Kind::Irqfd { .. } => "irqfd",
            Kind::Ioctl(_) => "ioctl",
        };
        f.debug_struct("InterruptLine")
            .field("gsi", &self.gsi)
            .field("kind", &kind)
            .finish()
    }
}

impl InterruptLine {
    /// A line for `gsi`, using irqfd when the VM supports it.
    ///
    /// # Errors
    /// A backend error other than "irqfd unsupported" when registering the irqfd.
    pub fn new(vm: &Arc<dyn Vm>, gsi: u32) -> Result<Self, HypervisorError> {
        #[cfg(target_os = "linux")]
        {
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| HypervisorError::backend("eventfd", e))?;
            match vm.register_irqfd(&fd, gsi) {
                Ok(()) => {
                    return Ok(InterruptLine {
                        gsi,
                        kind: Kind::Irqfd { fd, vm: vm.clone() },
                    })
                }
                Err(HypervisorError::Unsupported(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(InterruptLine {
            gsi,
            kind: Kind::Ioctl(vm.clone()),
        })
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Raises an edge on the line.
    ///
    /// # Errors
    /// The eventfd write or the backend call failed.
    pub fn trigger(&self) -> std::io::Result<()> {
        match &self.kind {
            #[cfg(target_os = "linux")]
            Kind::Irqfd { fd, .. } => fd.write(1),
            Kind::Ioctl(vm) => vm
                .set_irq_line(self.gsi, true)
                .and_then(|()| vm.set_irq_line(self.gsi, false))
                .map_err(std::io::Error::other),
        }
    }
}

impl Drop for InterruptLine {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Kind::Irqfd { fd, vm } = &self.kind {
            if let Err(e) = vm.unregister_irqfd(fd, self.gsi) {
                log::debug!("unregistering irqfd for GSI {}: {e}", self.gsi);
            }
        }
    }
}

//! Devices the guest reaches through port I/O or MMIO exits.
//!
//! - [`bus`]: address ranges → devices, shared by port I/O and MMIO.
//! - [`irq`]: an interrupt line a device raises (irqfd where the backend has it).
//! - [`legacy`]: the PC devices a microVM keeps: 16550 serial console, i8042 (reset only)
//!   and the ACPI power-management control register (power-off); and, for the split irqchip,
//!   a userspace IOAPIC.
//! - [`rate_limiter`]: token buckets (bytes/s, operations/s) that devices use to cap what one
//!   guest can take from the host.

pub mod bus;
pub mod irq;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use irq::InterruptLine;

use std::sync::Arc;

/// Platform-level requests devices make on behalf of the guest.
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::{PlatformEvent, PlatformEventSink};
/// let last = Arc::new(Mutex::new(None));
/// let l = last.clone();
/// let sink: PlatformEventSink = Arc::new(move |e| *l.lock().unwrap() = Some(e));
/// sink(PlatformEvent::PowerOff); // what PmControl does when the guest writes SLP_EN
/// assert_eq!(*last.lock().unwrap(), Some(PlatformEvent::PowerOff));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformEvent {
    /// The guest asked for a reset (i8042 pulse, reset register).
    Reset,
    /// The guest asked to be powered off.
    PowerOff,
}

/// Where devices send [`PlatformEvent`]s; the VMM turns them into the VM's exit reason.
pub type PlatformEventSink = Arc<dyn Fn(PlatformEvent) + Send + Sync>;

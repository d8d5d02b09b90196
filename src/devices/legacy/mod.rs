//! The PC legacy devices a microVM keeps, at their traditional x86 ports.

pub mod i8042;
pub mod ioapic;
pub mod pm_control;
pub mod serial;

pub use i8042::I8042;
pub use ioapic::Ioapic;
pub use pm_control::PmControl;
pub use serial::{ConsoleSink, Serial};

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt (ISA IRQ 4).
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI PM1a control register (QEMU's ICH9 location, so guests that know QEMU's power-off
/// port work unchanged).
pub const PM1A_CONTROL_PORT: u16 = 0x604;

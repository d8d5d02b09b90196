//! # smolvm
//!
//! A minimal virtual machine monitor as a library: fast, hardware-isolated Linux microVMs
//! inside your own process.
//!
//! The crate is layered the way a VM comes to life:
//!
//! - [`hypervisor`]: traits per layer (hypervisor → VM → vCPU) and one backend per host
//!   (KVM on x86_64 and aarch64 today). Backend types never leave their module.
//! - [`boot`] and [`arch`]: loading a Linux kernel (vmlinux ELF, PVH, bzImage), the initrd and
//!   the kernel command line, and the platform tables the kernel reads (zero page, e820, MP
//!   table, page tables, GDT).
//! - [`devices`]: the port-I/O/MMIO bus and the legacy devices (16550 serial console, i8042
//!   reset, power-off register).
//! - [`agent`]: the host side of the guest agent (run commands, copy files in a running VM).
//! - [`probe`](mod@probe): what this host can run, and how to fix what it cannot (`examples/doctor.rs`).
//! - [`vmm`]: the lifecycle — [`VmBuilder`] (configuration) → [`VmHandle`] (a running VM with
//!   `wait`, `pause`, `resume`, `stop`).
//!
//! # Example
//! ```no_run
//! use smolvm::{ExitReason, VmBuilder};
//!
//! let vm = VmBuilder::new()
//!     .memory_mib(128)
//!     .vcpus(1)
//!     .kernel("vmlinux")
//!     .console(std::io::stdout())
//!     .start()?;
//! match vm.wait() {
//!     ExitReason::Reset | ExitReason::PowerOff => println!("guest finished"),
//!     other => eprintln!("guest stopped: {other}"),
//! }
//! # Ok::<(), smolvm::Error>(())
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod arch;
pub mod boot;
pub mod devices;
mod error;
pub mod hypervisor;
pub mod memory;
pub mod probe;
pub mod vmm;

pub use error::{Error, Result};
pub use probe::probe;
pub use vmm::{ExitReason, NetDevice, VmBuilder, VmHandle, VmState};

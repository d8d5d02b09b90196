//! The VM lifecycle: configuration ([`VmBuilder`]) → a running VM ([`VmHandle`]) → why it
//! stopped ([`ExitReason`]).
//!
//! One thread per vCPU runs guest code and handles its exits (port I/O, MMIO) inline; the
//! handle coordinates them through [`control`](self) state and vCPU kicks.

#[cfg(target_arch = "aarch64")]
mod boot_aarch64;
mod builder;
mod config;
mod control;
mod device_loop;
mod exit;
#[cfg(target_os = "linux")]
mod guest_access;
mod handle;
mod net_config;
mod vcpu_thread;

pub use config::VmBuilder;
pub use exit::ExitReason;
#[cfg(target_os = "linux")]
pub use guest_access::AGENT_CONNECT_TIMEOUT;
pub use handle::{VmHandle, VmState};
pub use net_config::NetDevice;

//! The crate-level error: what can go wrong building or controlling a VM.

use crate::boot::BootError;
use crate::devices::BusError;
use crate::hypervisor::HypervisorError;
use crate::memory::MemoryError;

/// Result alias for smolvm's public API.
pub type Result<T> = std::result::Result<T, Error>;

/// Why building or controlling a VM failed. Each message says what to change.
///
/// # Example
/// ```no_run
/// use smolvm::{Error, VmBuilder};
/// match VmBuilder::new().kernel("vmlinux").start() {
///     Ok(vm) => println!("{}", vm.wait()),
///     Err(Error::Hypervisor(e)) => eprintln!("host not ready: {e}"),
///     Err(Error::Boot(e)) => eprintln!("bad kernel or initrd: {e}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or driving the hypervisor failed (including `/dev/kvm` missing or not
    /// accessible).
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Guest memory could not be allocated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A device range collides with another.
    #[error("cannot add device: {0}")]
    Bus(#[from] BusError),
    /// A virtio-net backend could not be set up (TAP device missing, no CAP_NET_ADMIN, ...).
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// The configuration is incomplete or inconsistent.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The host hypervisor is a software one (`kvm_pvm`) that cannot run an unmodified Linux
    /// kernel, and the caller asked for one that can.
    #[error(
        "/dev/kvm on this host is kvm_pvm, a software hypervisor that emulates guest kernel \
         mode: an unmodified Linux kernel cannot boot here. Run on a host with hardware \
         virtualization (VT-x/AMD-V, or nested virtualization enabled), or boot a purpose-built \
         small guest"
    )]
    SoftwareVirtualization,
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The VM is not in a state that allows the operation.
    #[error("VM is {state}: cannot {op}")]
    InvalidState {
        /// The attempted operation.
        op: &'static str,
        /// The VM's state.
        state: &'static str,
    },
    /// The vsock device could not be created (bad guest CID, unusable socket path, ...).
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// A vsock connection to or from the guest failed (`ConnectionRefused`: nothing listens
    /// on that guest port; `TimedOut`: the guest did not answer).
    #[error("vsock {op}: {source}")]
    VsockIo {
        /// What was attempted (`connect to guest port 52`, `listen on host port 9000`).
        op: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent failed or reported an error (see [`AgentError`](crate::agent::AgentError)).
    #[error(transparent)]
    Agent(Box<crate::agent::AgentError>),
}

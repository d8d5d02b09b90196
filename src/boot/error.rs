//! Errors of the boot path. Each message says what to check or change.

use std::path::PathBuf;

/// Why a kernel, initrd or command line could not be loaded.
///
/// # Example
/// ```
/// use smolvm::{arch::x86_64::mptable, boot::BootError};
/// match mptable::build(0) {
///     Err(BootError::TooManyVcpus(n)) => assert_eq!(n, 0),
///     other => panic!("expected TooManyVcpus, got {other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}; check the path given to .kernel()")]
    KernelFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a 64-bit x86 ELF (vmlinux) nor a bzImage.
    #[error(
        "{path} is not a bootable kernel ({detail}); pass an uncompressed vmlinux ELF or a bzImage"
    )]
    KernelFormat {
        /// The path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The kernel file is not an arm64 `Image` (aarch64 guests).
    #[error(
        "{path} is not a bootable arm64 kernel: {source}; pass an uncompressed little-endian \
         arm64 Image (arch/arm64/boot/Image)"
    )]
    Arm64Image {
        /// The path.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: crate::arch::aarch64::image::ImageError,
    },
    /// The device tree could not be generated (aarch64 guests).
    #[error("cannot generate the device tree: {0}")]
    DeviceTree(#[from] crate::arch::aarch64::fdt::FdtError),
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd {path}: {source}; check the path given to .initrd()")]
    InitrdFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory cannot hold the kernel, initrd and boot structures.
    #[error(
        "guest memory too small: {what} needs {needed} bytes but only {available} are free; \
         raise .memory_mib()"
    )]
    MemoryTooSmall {
        /// What did not fit (`"kernel"`, `"initrd"`).
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The command line is too long or contains a NUL byte.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory at {addr:#x}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// A vCPU count the platform tables cannot describe: 0, or more than
    /// [`MAX_VCPUS`](crate::arch::x86_64::mptable::MAX_VCPUS) (the MP table's APIC ids are 8
    /// bits, and one of them is the IOAPIC's).
    #[error(
        "{0} vCPUs requested; the MP table describes 1 to {max} (8-bit APIC ids, one of them \
         the IOAPIC's)",
        max = crate::arch::x86_64::mptable::MAX_VCPUS
    )]
    TooManyVcpus(u32),
    /// An aarch64 vCPU count the platform cannot describe: 0, or more than the GIC
    /// redistributor region has room for
    /// ([`MAX_VCPUS`](crate::arch::aarch64::layout::MAX_VCPUS)).
    #[error(
        "{0} vCPUs requested; the arm64 platform has GIC redistributors for 1 to {max}",
        max = crate::arch::aarch64::layout::MAX_VCPUS
    )]
    TooManyArm64Vcpus(u32),
}

//! KVM backend. The only place in the crate that names kvm-ioctls or kvm-bindings types.

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod kick;
mod vcpu;
mod vm;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::sync::Arc;
#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Cap;

use super::{Capabilities, Hypervisor, HypervisorError, Result, Vm};

pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

const KVM_PATH: &str = "/dev/kvm";

/// An open `/dev/kvm`.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{kvm::Kvm, Hypervisor};
/// let kvm = Kvm::open()?;
/// assert_eq!(kvm.name(), "kvm");
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
    caps: Capabilities,
    /// `KVM_GET_SUPPORTED_CPUID` (plus the features KVM reports elsewhere) is the same for
    /// every VM; ask once.
    #[cfg(target_arch = "x86_64")]
    supported_cpuid: OnceLock<std::result::Result<Arc<CpuId>, i32>>,
}

impl std::fmt::Debug for Kvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kvm").field("caps", &self.caps).finish()
    }
}

impl Kvm {
    /// Opens `/dev/kvm` and probes its capabilities.
    ///
    /// # Errors
    /// [`HypervisorError::NotFound`], [`HypervisorError::PermissionDenied`] (both say how to
    /// fix the host), or [`HypervisorError::MissingCapability`] when the kernel lacks
    /// something smolvm needs.
    pub fn open() -> Result<Self> {
        Self::open_path(KVM_PATH)
    }

    /// Like [`Kvm::open`], for a KVM device at another path (containers sometimes bind it
    /// elsewhere).
    ///
    /// # Example
    /// ```
    /// use smolvm::hypervisor::{kvm::Kvm, HypervisorError};
    /// let err = Kvm::open_path("/nonexistent/kvm").unwrap_err();
    /// assert!(matches!(err, HypervisorError::NotFound { .. }));
    /// ```
    pub fn open_path(path: &'static str) -> Result<Self> {
        let cpath = std::ffi::CString::new(path)
            .map_err(|_| HypervisorError::InvalidArgument(format!("path {path:?} has a NUL")))?;
        let kvm =
            kvm_ioctls::Kvm::new_with_path(&cpath).map_err(|e| open_error(path, e.errno()))?;
        if kvm.get_api_version() != 12 {
            return Err(HypervisorError::MissingCapability("KVM API version 12"));
        }
        #[cfg(target_arch = "x86_64")]
        let required = [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ];
        // arm64: the GICv3 is a KVM device, boot registers go through ONE_REG, and secondary
        // vCPUs are started by the guest through the in-kernel PSCI 0.2.
        #[cfg(target_arch = "aarch64")]
        let required = [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::OneReg, "KVM_CAP_ONE_REG"),
            (Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
            (Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
        ];
        for (cap, name) in required {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        let caps = Capabilities {
            max_vcpus: kvm.get_max_vcpus() as u32,
            max_memory_slots: kvm.get_nr_memslots() as u32,
            irqfd: kvm.check_extension(Cap::Irqfd),
            ioeventfd: kvm.check_extension(Cap::Ioeventfd),
            msi: kvm.check_extension(Cap::SignalMsi),
            emulation_failure_details: kvm
                .check_extension_raw(kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE.into())
                > 0,
            software_virtualization: is_software_kvm(),
        };
        if caps.software_virtualization {
            log::warn!(
                "/dev/kvm is backed by kvm_pvm (software virtualization): guest kernel mode is \
                 emulated; small purpose-built guests run, an unmodified Linux kernel cannot boot"
            );
        }
        Ok(Kvm {
            kvm,
            caps,
            #[cfg(target_arch = "x86_64")]
            supported_cpuid: OnceLock::new(),
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> Result<Arc<CpuId>> {
        self.supported_cpuid
            .get_or_init(|| {
                let mut cpuid = self
                    .kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| e.errno())?;
                x86_64::add_emulated_features(
                    cpuid.as_mut_slice(),
                    self.kvm.check_extension(Cap::TscDeadlineTimer),
                );
                Ok(Arc::new(cpuid))
            })
            .clone()
            .map_err(|errno| {
                HypervisorError::backend(
                    "KVM_GET_SUPPORTED_CPUID",
                    std::io::Error::from_raw_os_error(errno),
                )
            })
    }
}

/// Maps the errno of opening the KVM device to an error that says how to fix the host.
fn open_error(path: &'static str, errno: i32) -> HypervisorError {
    match errno {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => HypervisorError::NotFound { path },
        libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied { path },
        _ => HypervisorError::backend("open KVM device", std::io::Error::from_raw_os_error(errno)),
    }
}

/// Whether `/dev/kvm` is the `kvm_pvm` software hypervisor (no VMX/SVM underneath).
fn is_software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

impl Hypervisor for Kvm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        #[cfg(target_arch = "x86_64")]
        let arch = self.supported_cpuid()?;
        #[cfg(target_arch = "aarch64")]
        let arch = ();
        Ok(Arc::new(KvmVm::new(&self.kvm, &self.caps, arch)?))
    }
}

/// Maps a kvm-ioctls error to ours.
fn err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::backend(op, std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_say_what_to_do() {
        let e = open_error("/dev/kvm", libc::EACCES);
        assert!(matches!(e, HypervisorError::PermissionDenied { .. }));
        assert!(e.to_string().contains("kvm` group"), "{e}");
        let e = open_error("/dev/kvm", libc::ENOENT);
        assert!(matches!(e, HypervisorError::NotFound { .. }));
        assert!(e.to_string().contains("modprobe"), "{e}");
        assert!(matches!(
            open_error("/dev/kvm", libc::EIO),
            HypervisorError::Backend { .. }
        ));
    }

    #[test]
    fn missing_device_is_not_found() {
        assert!(matches!(
            Kvm::open_path("/nonexistent/kvm"),
            Err(HypervisorError::NotFound { .. })
        ));
    }

    #[test]
    fn a_file_that_is_not_kvm_is_rejected() {
        // /dev/null opens fine but answers no KVM ioctl.
        assert!(Kvm::open_path("/dev/null").is_err());
    }
}

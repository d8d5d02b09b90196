//! Errors of the hypervisor layer.

/// Result alias for the hypervisor layer.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Why a hypervisor operation failed. Messages say what to do where the host can be fixed.
///
/// # Example
/// ```
/// use smolvm::hypervisor::{self, HypervisorError};
/// match hypervisor::open() {
///     Ok(hv) => println!("using {}", hv.name()),
///     Err(e @ (HypervisorError::NotFound { .. } | HypervisorError::PermissionDenied { .. })) => {
///         eprintln!("fix the host first: {e}")
///     }
///     Err(e) => eprintln!("no hypervisor: {e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HypervisorError {
    /// The hypervisor device does not exist.
    #[error(
        "{path} does not exist: load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`) \
         and enable virtualization in the firmware, or run on a host with nested virtualization"
    )]
    NotFound {
        /// The device path that was tried.
        path: &'static str,
    },
    /// The hypervisor device exists but this process may not open it.
    #[error(
        "permission denied opening {path}: add this user to the `kvm` group \
         (`sudo usermod -aG kvm $USER`, then log in again) or grant access with an ACL \
         (`sudo setfacl -m u:$USER:rw {path}`)"
    )]
    PermissionDenied {
        /// The device path that was tried.
        path: &'static str,
    },
    /// The host's hypervisor lacks something smolvm needs.
    #[error("the host hypervisor lacks {0}")]
    MissingCapability(&'static str),
    /// The operation does not exist on this backend or host.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// A backend call failed.
    #[error("{op} failed: {source}")]
    Backend {
        /// The operation, e.g. `KVM_CREATE_VCPU`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An argument was rejected before reaching the backend.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl HypervisorError {
    /// Wraps an OS error from backend call `op`.
    ///
    /// # Example
    /// ```
    /// use smolvm::hypervisor::HypervisorError;
    /// let os_error = std::io::Error::from_raw_os_error(libc::EEXIST);
    /// let e = HypervisorError::backend("KVM_CREATE_VCPU", os_error);
    /// assert!(matches!(&e, HypervisorError::Backend { op: "KVM_CREATE_VCPU", .. }));
    /// assert!(e.to_string().starts_with("KVM_CREATE_VCPU failed: "));
    /// ```
    pub fn backend(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        HypervisorError::Backend {
            op,
            source: source.into(),
        }
    }
}

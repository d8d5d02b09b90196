//! Host probe: can this machine run smolvm VMs, and if not, what to do about it.
//!
//! [`probe`] runs every check without starting a VM and returns a [`ProbeReport`]: which
//! backend this build uses, whether `/dev/kvm` exists and opens read-write, the KVM API
//! version and the capabilities smolvm needs, whether the hypervisor can run an unmodified
//! Linux kernel (hardware VMX/SVM versus the `kvm_pvm` software hypervisor), and whether TAP
//! networking is permitted. Each failing check carries a fix. `examples/doctor.rs` prints the
//! report for humans or as JSON.
//!
//! The checks read the host through a [`HostView`] (paths and `/proc/self/status`) so unit
//! tests can point them at a fake sysfs.
//!
//! # Example
//! ```
//! let report = smolvm::probe::probe();
//! for check in &report.checks {
//!     println!("{:?} {}: {}", check.status, check.name, check.detail);
//! }
//! // `can_boot_linux` is false where /dev/kvm is missing or a software hypervisor.
//! let _ = report.can_boot_linux();
//! ```

use std::path::{Path, PathBuf};

/// How a check came out.
///
/// # Example
/// ```
/// use smolvm::probe::CheckStatus;
/// assert_ne!(CheckStatus::Pass, CheckStatus::Fail);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Works.
    Pass,
    /// Works with a limitation (the detail says which).
    Warn,
    /// Does not work; [`Check::fix`] says what to do.
    Fail,
    /// Does not apply to this host (another platform's check).
    Skipped,
}

impl CheckStatus {
    /// Lower-case name, as printed by the doctor and used in its JSON.
    ///
    /// # Example
    /// ```
    /// assert_eq!(smolvm::probe::CheckStatus::Warn.as_str(), "warn");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
            CheckStatus::Skipped => "skipped",
        }
    }
}

/// One check's outcome.
///
/// # Example
/// ```
/// let report = smolvm::probe::probe();
/// let kvm = report.get("kvm_device");
/// assert!(kvm.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable identifier (`backend`, `kvm_device`, `kvm_api`, `kvm_capabilities`,
    /// `hardware_virtualization`, `tap`, `hvf_entitlement`).
    pub name: &'static str,
    /// The outcome.
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// What to do when the status is [`CheckStatus::Fail`] or [`CheckStatus::Warn`].
    pub fix: Option<String>,
}

/// Every check, in order.
///
/// # Example
/// ```
/// let report = smolvm::probe::probe();
/// println!("{}", report.to_json());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl ProbeReport {
    /// The check called `name`.
    ///
    /// # Example
    /// ```
    /// assert!(smolvm::probe::probe().get("backend").is_some());
    /// ```
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Whether VMs can start at all here (tiny guests run).
    ///
    /// # Example
    /// ```
    /// if !smolvm::probe::probe().can_run_vms() { eprintln!("no usable hypervisor"); }
    /// ```
    pub fn can_run_vms(&self) -> bool {
        ["backend", "kvm_device", "kvm_api", "kvm_capabilities"]
            .iter()
            .all(|n| self.get(n).is_none_or(|c| c.status != CheckStatus::Fail))
            && self
                .get("backend")
                .is_some_and(|c| c.status == CheckStatus::Pass)
    }

    /// Whether an unmodified Linux kernel can boot here: VMs run and the hypervisor is
    /// hardware-assisted.
    ///
    /// # Example
    /// ```
    /// if !smolvm::probe::probe().can_boot_linux() { eprintln!("only tiny guests here"); }
    /// ```
    pub fn can_boot_linux(&self) -> bool {
        self.can_run_vms()
            && self
                .get("hardware_virtualization")
                .is_some_and(|c| c.status == CheckStatus::Pass)
    }

    /// The first failing check that stops Linux from booting, with its fix, as one message.
    ///
    /// # Example
    /// ```
    /// if let Some(why) = smolvm::probe::probe().linux_blocker() { eprintln!("{why}"); }
    /// ```
    pub fn linux_blocker(&self) -> Option<String> {
        self.checks
            .iter()
            .filter(|c| c.name != "tap" && c.name != "hvf_entitlement")
            .find(|c| c.status == CheckStatus::Fail)
            .map(|c| match &c.fix {
                Some(fix) => format!("{}: {} ({fix})", c.name, c.detail),
                None => format!("{}: {}", c.name, c.detail),
            })
    }

    /// The report as a JSON object `{"checks":[{"name":..,"status":..,"detail":..,"fix":..}],
    /// "can_run_vms":..,"can_boot_linux":..}`.
    ///
    /// # Example
    /// ```
    /// assert!(smolvm::probe::probe().to_json().starts_with("{\"checks\":["));
    /// ```
    pub fn to_json(&self) -> String {
        let mut out = String::from("{\"checks\":[");
        for (i, c) in self.checks.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "{{\"name\":{},\"status\":{},\"detail\":{},\"fix\":{}}}",
                json_str(c.name),
                json_str(c.status.as_str()),
                json_str(&c.detail),
                c.fix.as_deref().map_or("null".to_string(), json_str)
            ));
        }
        out.push_str(&format!(
            "],\"can_run_vms\":{},\"can_boot_linux\":{}}}",
            self.can_run_vms(),
            self.can_boot_linux()
        ));
        out
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where the checks look: the real host, or a fake tree in tests.
///
/// # Example
/// ```
/// let host = smolvm::probe::HostView::real();
/// assert_eq!(host.kvm_device, std::path::PathBuf::from("/dev/kvm"));
/// ```
#[derive(Debug, Clone)]
pub struct HostView {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// `/sys/module`: which kernel modules provide KVM.
    pub sys_module: PathBuf,
    /// The TUN/TAP control device.
    pub tun_device: PathBuf,
    /// The contents of `/proc/self/status` (for the effective capability set), if readable.
    pub proc_status: Option<String>,
}

impl HostView {
    /// This machine.
    ///
    /// # Example
    /// See [`HostView`].
    pub fn real() -> Self {
        HostView {
            kvm_device: PathBuf::from("/dev/kvm"),
            sys_module: PathBuf::from("/sys/module"),
            tun_device: PathBuf::from("/dev/net/tun"),
            proc_status: std::fs::read_to_string("/proc/self/status").ok(),
        }
    }
}

/// Runs every check against this machine.
///
/// # Example
/// See the [module documentation](self).
pub fn probe() -> ProbeReport {
    probe_host(&HostView::real())
}

/// Runs every check against `host` (the KVM API and capability checks open
/// `host.kvm_device` for real).
///
/// # Example
/// ```
/// let report = smolvm::probe::probe_host(&smolvm::probe::HostView::real());
/// assert!(!report.checks.is_empty());
/// ```
pub fn probe_host(host: &HostView) -> ProbeReport {
    let mut checks = vec![backend_check()];
    if cfg!(target_os = "linux") {
        let device = kvm_device_check(&host.kvm_device);
        let usable = device.status == CheckStatus::Pass;
        checks.push(device);
        checks.extend(kvm_api_checks(&host.kvm_device, usable));
        checks.push(hardware_virtualization_check(&host.sys_module));
        checks.push(tap_check(&host.tun_device, host.proc_status.as_deref()));
        checks.push(skipped("hvf_entitlement", "macOS only"));
    } else {
        for name in [
            "kvm_device",
            "kvm_api",
            "kvm_capabilities",
            "hardware_virtualization",
            "tap",
        ] {
            checks.push(skipped(name, "Linux only"));
        }
        checks.push(Check {
            name: "hvf_entitlement",
            status: CheckStatus::Fail,
            detail: "the Hypervisor.framework backend is not implemented yet".into(),
            fix: Some(
                "run on Linux with KVM; when the HVF backend lands, sign the binary with \
                 the com.apple.security.hypervisor entitlement"
                    .into(),
            ),
        });
    }
    ProbeReport { checks }
}

fn skipped(name: &'static str, why: &str) -> Check {
    Check {
        name,
        status: CheckStatus::Skipped,
        detail: why.into(),
        fix: None,
    }
}

fn backend_check() -> Check {
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        Check {
            name: "backend",
            status: CheckStatus::Pass,
            detail: "KVM on x86_64".into(),
            fix: None,
        }
    } else if cfg!(all(target_os = "linux", target_arch = "aarch64")) {
        Check {
            name: "backend",
            status: CheckStatus::Pass,
            detail: "KVM on aarch64 (GICv3, PSCI)".into(),
            fix: None,
        }
    } else {
        Check {
            name: "backend",
            status: CheckStatus::Fail,
            detail: format!(
                "no backend can boot guests on {}-{} yet",
                std::env::consts::OS,
                std::env::consts::ARCH
            ),
            fix: Some("use a Linux host with KVM (x86_64 or aarch64)".into()),
        }
    }
}

/// `/dev/kvm` exists and opens read-write.
fn kvm_device_check(path: &Path) -> Check {
    let name = "kvm_device";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check {
            name,
            status: CheckStatus::Pass,
            detail: format!("{} opens read-write", path.display()),
            fix: None,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check {
            name,
            status: CheckStatus::Fail,
            detail: format!("{} does not exist", path.display()),
            fix: Some(
                "load the KVM module (modprobe kvm_intel or kvm_amd) and enable VT-x/AMD-V \
                 in the firmware; in a cloud VM, pick an instance type with nested \
                 virtualization"
                    .into(),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check {
            name,
            status: CheckStatus::Fail,
            detail: format!("{} exists but cannot be opened read-write", path.display()),
            fix: Some(format!(
                "add your user to the group owning {} (usually kvm: sudo usermod -aG kvm \
                 $USER, then log in again)",
                path.display()
            )),
        },
        Err(e) => Check {
            name,
            status: CheckStatus::Fail,
            detail: format!("opening {}: {e}", path.display()),
            fix: Some("check that the KVM module loaded without errors (dmesg)".into()),
        },
    }
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn kvm_api_checks(path: &Path, usable: bool) -> Vec<Check> {
    use crate::hypervisor::{Hypervisor, HypervisorError};
    if !usable {
        return vec![
            skipped("kvm_api", "needs an openable KVM device"),
            skipped("kvm_capabilities", "needs an openable KVM device"),
        ];
    }
    let leaked: &'static str = match path.to_str() {
        Some("/dev/kvm") => "/dev/kvm",
        Some(p) => Box::leak(p.to_owned().into_boxed_str()),
        None => {
            return vec![skipped("kvm_api", "device path is not UTF-8")];
        }
    };
    match crate::hypervisor::kvm::Kvm::open_path(leaked) {
        Ok(kvm) => {
            let caps = kvm.capabilities();
            let mut missing = Vec::new();
            if !caps.irqfd {
                missing.push("KVM_CAP_IRQFD");
            }
            if !caps.ioeventfd {
                missing.push("KVM_CAP_IOEVENTFD");
            }
            vec![
                Check {
                    name: "kvm_api",
                    status: CheckStatus::Pass,
                    detail: "KVM API version 12".into(),
                    fix: None,
                },
                if missing.is_empty() {
                    Check {
                        name: "kvm_capabilities",
                        status: CheckStatus::Pass,
                        detail: format!(
                            "everything smolvm needs, irqfd and ioeventfd included; up to {} \
                             vCPUs, {} memory slots",
                            caps.max_vcpus, caps.max_memory_slots
                        ),
                        fix: None,
                    }
                } else {
                    Check {
                        name: "kvm_capabilities",
                        status: CheckStatus::Warn,
                        detail: format!(
                            "missing {}: device notifications take the slower exit path",
                            missing.join(", ")
                        ),
                        fix: Some("use a newer host kernel".into()),
                    }
                },
            ]
        }
        Err(HypervisorError::MissingCapability(what)) => vec![
            Check {
                name: "kvm_api",
                status: CheckStatus::Pass,
                detail: "KVM device answers".into(),
                fix: None,
            },
            Check {
                name: "kvm_capabilities",
                status: CheckStatus::Fail,
                detail: format!("missing {what}"),
                fix: Some("use a host kernel of 4.14 or newer with KVM".into()),
            },
        ],
        Err(e) => vec![
            Check {
                name: "kvm_api",
                status: CheckStatus::Fail,
                detail: e.to_string(),
                fix: Some("check dmesg for KVM errors".into()),
            },
            skipped("kvm_capabilities", "the KVM API check failed"),
        ],
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn kvm_api_checks(_path: &Path, _usable: bool) -> Vec<Check> {
    vec![
        skipped("kvm_api", "no KVM backend for this architecture yet"),
        skipped(
            "kvm_capabilities",
            "no KVM backend for this architecture yet",
        ),
    ]
}

/// Which module provides KVM: `kvm_intel` / `kvm_amd` (hardware VMX/SVM) can boot any
/// kernel; `kvm_pvm` emulates guest kernel mode and cannot boot unmodified Linux.
fn hardware_virtualization_check(sys_module: &Path) -> Check {
    let name = "hardware_virtualization";
    let has = |m: &str| sys_module.join(m).exists();
    if cfg!(target_arch = "aarch64") && !has("kvm_pvm") {
        // arm64 KVM runs guests at EL1 on the CPU's own virtualization extensions (EL2);
        // there is no software variant to tell apart.
        return Check {
            name,
            status: CheckStatus::Pass,
            detail: "arm64 KVM (EL2 virtualization extensions)".into(),
            fix: None,
        };
    }
    if has("kvm_pvm") {
        Check {
            name,
            status: CheckStatus::Fail,
            detail: "/dev/kvm is kvm_pvm, a software hypervisor: guest kernel mode is emulated \
                     and an unmodified Linux kernel cannot boot (small purpose-built guests run)"
                .into(),
            fix: Some(
                "run on bare metal or a VM with nested virtualization (kvm_intel or kvm_amd)"
                    .into(),
            ),
        }
    } else if has("kvm_intel") {
        Check {
            name,
            status: CheckStatus::Pass,
            detail: "kvm_intel (VMX)".into(),
            fix: None,
        }
    } else if has("kvm_amd") {
        Check {
            name,
            status: CheckStatus::Pass,
            detail: "kvm_amd (SVM)".into(),
            fix: None,
        }
    } else if has("kvm") {
        Check {
            name,
            status: CheckStatus::Warn,
            detail: "kvm is loaded but neither kvm_intel, kvm_amd nor kvm_pvm is listed".into(),
            fix: Some("check /sys/module for the vendor module; it may be built in".into()),
        }
    } else {
        Check {
            name,
            status: CheckStatus::Fail,
            detail: "no KVM module is loaded".into(),
            fix: Some("modprobe kvm_intel (or kvm_amd)".into()),
        }
    }
}

/// CAP_NET_ADMIN is bit 12 of the effective capability set.
const CAP_NET_ADMIN: u32 = 12;

/// The effective capability mask from `/proc/self/status` text (`CapEff:\t<hex>`).
fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// TAP networking needs `/dev/net/tun` and CAP_NET_ADMIN to create interfaces.
fn tap_check(tun: &Path, proc_status: Option<&str>) -> Check {
    let name = "tap";
    if !tun.exists() {
        return Check {
            name,
            status: CheckStatus::Fail,
            detail: format!("{} does not exist", tun.display()),
            fix: Some("modprobe tun (or create the node: mknod /dev/net/tun c 10 200)".into()),
        };
    }
    match proc_status.and_then(effective_capabilities) {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => Check {
            name,
            status: CheckStatus::Pass,
            detail: format!("{} present, CAP_NET_ADMIN held", tun.display()),
            fix: None,
        },
        Some(_) => Check {
            name,
            status: CheckStatus::Warn,
            detail: "no CAP_NET_ADMIN: smolvm cannot create TAP devices, only open ones made \
                     for this user"
                .into(),
            fix: Some(
                "create the TAP beforehand (ip tuntap add dev tap0 mode tap user $USER) or \
                 grant the capability (setcap cap_net_admin+ep <binary>)"
                    .into(),
            ),
        },
        None => Check {
            name,
            status: CheckStatus::Warn,
            detail: "could not read the process capabilities".into(),
            fix: Some("check /proc/self/status is readable".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys(modules: &[&str]) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "smolvm-probe-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        for m in modules {
            std::fs::create_dir_all(dir.join(m)).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn kvm_pvm_is_detected_as_software_virtualization() {
        let sys = fake_sys(&["kvm", "kvm_pvm"]);
        let c = hardware_virtualization_check(&sys);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("kvm_pvm"));
        assert!(c.fix.unwrap().contains("nested virtualization"));
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn vendor_modules_pass() {
        for (m, want) in [("kvm_intel", "VMX"), ("kvm_amd", "SVM")] {
            let sys = fake_sys(&["kvm", m]);
            let c = hardware_virtualization_check(&sys);
            assert_eq!(c.status, CheckStatus::Pass, "{m}");
            assert!(c.detail.contains(want));
            std::fs::remove_dir_all(sys).unwrap();
        }
        let sys = fake_sys(&[]);
        // x86 needs a vendor module; arm64 KVM is always hardware-assisted.
        let want = if cfg!(target_arch = "aarch64") {
            CheckStatus::Pass
        } else {
            CheckStatus::Fail
        };
        assert_eq!(hardware_virtualization_check(&sys).status, want);
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn missing_kvm_device_says_how_to_fix_it() {
        let c = kvm_device_check(Path::new("/nonexistent/kvm"));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.fix.unwrap().contains("modprobe"));
    }

    #[test]
    fn capabilities_are_parsed_from_proc_status() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
        let tun = fake_sys(&["tun"]).join("tun");
        assert_eq!(tap_check(&tun, Some(status)).status, CheckStatus::Pass);
        let c = tap_check(&tun, Some("CapEff:\t0000000000000000\n"));
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c.fix.unwrap().contains("ip tuntap"));
        assert_eq!(
            tap_check(Path::new("/nonexistent/tun"), Some(status)).status,
            CheckStatus::Fail
        );
    }

    #[test]
    fn report_json_escapes_and_summarises() {
        let r = ProbeReport {
            checks: vec![
                Check {
                    name: "backend",
                    status: CheckStatus::Pass,
                    detail: "KVM \"x\"\n".into(),
                    fix: None,
                },
                Check {
                    name: "hardware_virtualization",
                    status: CheckStatus::Fail,
                    detail: "kvm_pvm".into(),
                    fix: Some("use hardware".into()),
                },
            ],
        };
        let j = r.to_json();
        assert!(j.contains(r#""detail":"KVM \"x\"\n""#), "{j}");
        assert!(j.contains(r#""fix":null"#));
        assert!(
            j.ends_with(r#""can_run_vms":true,"can_boot_linux":false}"#),
            "{j}"
        );
        assert_eq!(
            r.linux_blocker().as_deref(),
            Some("hardware_virtualization: kvm_pvm (use hardware)")
        );
    }

    #[test]
    fn this_host_reports_every_check() {
        let r = probe();
        for name in [
            "backend",
            "kvm_device",
            "kvm_api",
            "kvm_capabilities",
            "hardware_virtualization",
            "tap",
            "hvf_entitlement",
        ] {
            assert!(r.get(name).is_some(), "missing check {name}");
        }
    }
}

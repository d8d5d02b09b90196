//! Bad host input gives a typed error whose message says what to do — never a panic.

#[path = "common/harness.rs"]
mod harness;

use std::sync::{Arc, Mutex};

use harness::{can_run, guests};
use smolvm::boot::BootError;
use smolvm::devices::BusDevice;
use smolvm::{Error, VmBuilder};

fn tmp(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("errors-test");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn missing_kernel_path_is_a_config_error() {
    let err = VmBuilder::new().start().unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains(".kernel("), "{err}");
}

#[test]
fn kernel_file_missing() {
    if !can_run() {
        return;
    }
    let err = VmBuilder::new()
        .kernel("/nonexistent/vmlinux")
        .start()
        .unwrap_err();
    assert!(
        matches!(err, Error::Boot(BootError::KernelFile { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn kernel_not_elf_or_bzimage() {
    if !can_run() {
        return;
    }
    let p = tmp("not-a-kernel.txt", &b"this is not a kernel\n".repeat(100));
    let err = VmBuilder::new().kernel(&p).start().unwrap_err();
    assert!(
        matches!(err, Error::Boot(BootError::KernelFormat { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("vmlinux") && msg.contains("bzImage"), "{msg}");
}

#[test]
fn memory_too_small_for_initrd() {
    if !can_run() {
        return;
    }
    let initrd = tmp("big-initrd", &vec![0x5a; 6 << 20]);
    let err = VmBuilder::new()
        .memory_mib(4)
        .kernel(guests::guest("hello"))
        .initrd(&initrd)
        .start()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Boot(BootError::MemoryTooSmall { what: "initrd", .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(".memory_mib()"), "{err}");
}

#[test]
fn initrd_missing() {
    if !can_run() {
        return;
    }
    let err = VmBuilder::new()
        .kernel(guests::guest("hello"))
        .initrd("/nonexistent/initrd")
        .start()
        .unwrap_err();
    assert!(
        matches!(err, Error::Boot(BootError::InitrdFile { .. })),
        "{err:?}"
    );
}

#[test]
fn impossible_sizes_are_config_errors() {
    if !can_run() {
        return;
    }
    for b in [
        VmBuilder::new().vcpus(0),
        VmBuilder::new().vcpus(100_000),
        VmBuilder::new().memory_mib(0),
    ] {
        let err = b.kernel(guests::guest("hello")).start().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }
}

struct Nop;
impl BusDevice for Nop {
    fn read(&mut self, _: u64, _: u64, d: &mut [u8]) {
        d.fill(0)
    }
    fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
}

#[test]
fn overlapping_devices_are_rejected() {
    if !can_run() {
        return;
    }
    let err = VmBuilder::new()
        .kernel(guests::guest("hello"))
        .pio_device(0x3fc, 2, Arc::new(Mutex::new(Nop)))
        .start()
        .unwrap_err();
    assert!(matches!(err, Error::Bus(_)), "{err:?}");
    let err = VmBuilder::new()
        .kernel(guests::guest("hello"))
        .mmio_device(0x10_0000, 0x1000, Arc::new(Mutex::new(Nop)))
        .start()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("MMIO gap"), "{err}");
}

#[test]
fn software_kvm_is_reported_when_hardware_is_required() {
    if !can_run() {
        return;
    }
    let hv = smolvm::hypervisor::open().expect("open kvm");
    let software = hv.capabilities().software_virtualization;
    assert_eq!(
        software,
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    );
    let r = VmBuilder::new()
        .kernel(guests::guest("hello"))
        .require_hardware_virtualization(true)
        .start();
    if software {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::SoftwareVirtualization), "{err:?}");
        assert!(err.to_string().contains("hardware virtualization"), "{err}");
    } else {
        let vm = r.expect("start on hardware KVM");
        vm.stop();
    }
}

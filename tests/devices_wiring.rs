//! Wiring of virtio-blk devices into the VM lifecycle through the public API: MMIO slots and
//! kernel command-line announcements, the device event loop's thread, and that stopping a VM
//! leaves no threads, file descriptors or scratch overlay files behind.

#[path = "common/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::Mutex;

use harness::{builder, can_run, guests, run_to_exit};
use smolvm::devices::virtio::block::{DiskImage, DiskMode, OverlayTarget};
use smolvm::hypervisor::IrqchipMode;
use smolvm::{Error, ExitReason};
use vm_memory::{Bytes, GuestAddress};

/// Tests that count threads and file descriptors must not overlap with other guest runs in
/// this process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A zero-filled base image of `size` bytes, removed when dropped.
struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str, size: usize) -> Self {
        let p = std::env::temp_dir().join(format!(
            "smolvm-wiring-{tag}-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&p, vec![0u8; size]).unwrap();
        TempImage(p)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The kernel command line the VM wrote into guest memory (boot_params.hdr.cmd_line_ptr).
fn guest_cmdline(vm: &smolvm::VmHandle) -> String {
    let mem = vm.memory().expect("memory");
    let ptr: u32 = mem.read_obj(GuestAddress(0x7000 + 0x228)).unwrap();
    assert_ne!(ptr, 0, "no command line pointer in the zero page");
    let mut buf = vec![0u8; 4096];
    mem.read_slice(&mut buf, GuestAddress(u64::from(ptr)))
        .unwrap();
    let end = buf.iter().position(|&b| b == 0).expect("NUL-terminated");
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

fn task_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn two_block_devices_are_announced_on_the_command_line() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let a = TempImage::new("a", 1 << 20);
    let b = TempImage::new("b", 64 << 10);
    let (builder, console, _) = builder("hello");
    let vm = builder
        .block_device(DiskImage::open(&a.0, DiskMode::ReadOnly).unwrap())
        .block_device(DiskImage::open(&b.0, DiskMode::Overlay(OverlayTarget::Memory)).unwrap())
        .start()
        .expect("start");
    let cmdline = guest_cmdline(&vm);
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmdline:?}"
    );
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "{cmdline:?}"
    );
    assert!(
        cmdline.find("@0xd0000000:5").unwrap() < cmdline.find("@0xd0001000:6").unwrap(),
        "devices announced in call order: {cmdline:?}"
    );
    let slots: Vec<_> = (0..3).map(|i| vm.block_slot(i).unwrap()).collect();
    assert_eq!(slots[0].map(|s| (s.addr, s.irq)), Some((0xd000_0000, 5)));
    assert_eq!(slots[1].map(|s| (s.addr, s.irq)), Some((0xd000_1000, 6)));
    assert_eq!(slots[2], None);
    assert_eq!(vm.block_stats(0).unwrap().reads, 0);
    assert!(matches!(vm.block_stats(2), Err(Error::Config(_))));
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::HELLO_OUTPUT);
    assert!(matches!(vm.block_stats(0), Err(Error::InvalidState { .. })));
}

#[test]
fn stop_with_a_block_device_leaves_no_threads_fds_or_overlay() {
    let _g = serial();
    if !can_run() {
        return;
    }
    // Warm-up: the first VM opens the process-wide /dev/kvm handle, which stays open.
    let (b, console, _) = builder("hello");
    let vm = b.start().expect("start");
    run_to_exit(&vm, &console);
    drop(vm);

    let ioeventfd = smolvm::hypervisor::open().unwrap().capabilities().ioeventfd;
    let base = TempImage::new("leak", 1 << 20);
    let overlay = base.0.with_extension("overlay");
    let _ = std::fs::remove_file(&overlay);
    let (fds, threads) = (harness::open_fds(), harness::threads());
    for mode in [IrqchipMode::Split, IrqchipMode::InKernel] {
        let disk = DiskImage::open(
            &base.0,
            DiskMode::Overlay(OverlayTarget::scratch_file(&overlay)),
        )
        .unwrap();
        let (b, console, _) = builder("spin");
        let vm = b.irqchip(mode).block_device(disk).start().expect("start");
        assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
        let names = task_names();
        if ioeventfd {
            assert!(
                names.iter().any(|n| n == "smolvm-devices"),
                "{mode:?}: no device event loop thread: {names:?}"
            );
            assert!(harness::threads() >= threads + 2);
        }
        assert!(harness::open_fds() > fds);
        assert_eq!(vm.stop(), ExitReason::Stopped);
        assert_eq!(
            harness::threads(),
            threads,
            "{mode:?}: threads left after stop()"
        );
        assert_eq!(
            harness::open_fds(),
            fds,
            "{mode:?}: file descriptors left after stop()"
        );
        assert!(
            !overlay.exists(),
            "{mode:?}: scratch overlay still on disk after stop()"
        );
        assert!(!task_names().iter().any(|n| n == "smolvm-devices"));
        drop(vm);
    }
    // The same after a guest-initiated exit and wait().
    let (b, console, _) = builder("hello");
    let vm = b
        .irqchip(IrqchipMode::Split)
        .block_device(DiskImage::open(&base.0, DiskMode::ReadOnly).unwrap())
        .start()
        .expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(harness::threads(), threads);
    assert_eq!(harness::open_fds(), fds);
    // The base image was never written.
    assert!(std::fs::read(&base.0).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn more_block_devices_than_slots_is_a_config_error() {
    let base = TempImage::new("many", 4096);
    let mut b = smolvm::VmBuilder::new().kernel("/nonexistent/vmlinux");
    for _ in 0..20 {
        b = b.block_device(DiskImage::open(&base.0, DiskMode::ReadOnly).unwrap());
    }
    match b.start() {
        Err(Error::Config(msg)) => {
            assert!(msg.contains("20 virtio devices"), "{msg}");
            assert!(msg.contains("at most 19"), "{msg}");
        }
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

/// Block, network and vsock devices take consecutive slots in that order, and a VM with all
/// of them (a vsock socket file included) leaves no thread, descriptor or file behind.
#[test]
fn net_and_vsock_take_the_slots_after_block_and_leave_nothing_behind() {
    use smolvm::devices::virtio::net::MemBackend;
    use smolvm::devices::virtio::vsock::VsockConfig;
    use smolvm::NetDevice;

    let _g = serial();
    if !can_run() {
        return;
    }
    // Warm-up: the first VM opens the process-wide /dev/kvm handle, which stays open.
    let (b, console, _) = builder("hello");
    let vm = b.start().expect("start");
    run_to_exit(&vm, &console);
    drop(vm);

    let base = TempImage::new("mixed", 1 << 20);
    let sock = std::env::temp_dir().join(format!("smolvm-wiring-{}.vsock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let (fds, threads) = (harness::open_fds(), harness::threads());
    let (b, console, _) = builder("spin");
    let vm = b
        .irqchip(IrqchipMode::Split)
        .block_device(DiskImage::open(&base.0, DiskMode::ReadOnly).unwrap())
        .net_device(NetDevice::backend(Box::new(MemBackend::default())).mac([2, 0, 0, 0, 0, 9]))
        .vsock(VsockConfig::new(7).uds_path(&sock))
        .start()
        .expect("start");
    assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
    let cmdline = guest_cmdline(&vm);
    for (i, (addr, irq)) in [(0xd000_0000u64, 5u32), (0xd000_1000, 6), (0xd000_2000, 7)]
        .iter()
        .enumerate()
    {
        let arg = format!("virtio_mmio.device=4K@{addr:#x}:{irq}");
        assert!(
            cmdline.contains(&arg),
            "device {i}: {arg} not in {cmdline:?}"
        );
    }
    assert_eq!(vm.block_slot(0).unwrap().map(|s| s.addr), Some(0xd000_0000));
    assert_eq!(vm.net_slot(0).unwrap().map(|s| s.addr), Some(0xd000_1000));
    assert_eq!(vm.vsock_slot().unwrap().map(|s| s.addr), Some(0xd000_2000));
    assert_eq!(vm.net_mac(0).unwrap(), [2, 0, 0, 0, 0, 9]);
    assert_eq!(vm.net_interface_name(0).unwrap(), None);
    assert_eq!(vm.vsock_cid().unwrap(), Some(7));
    assert!(matches!(vm.net_stats(1), Err(Error::Config(_))));
    assert!(
        sock.exists(),
        "the vsock socket file is created with the VM"
    );
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert_eq!(harness::threads(), threads, "threads left after stop()");
    assert_eq!(harness::open_fds(), fds, "descriptors left after stop()");
    assert!(!sock.exists(), "the vsock socket file outlived the VM");
    assert!(matches!(vm.net_stats(0), Err(Error::InvalidState { .. })));
}

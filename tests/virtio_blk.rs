//! virtio-blk end to end: the `virtio_blk` tiny guest (guest/tiny/virtio_blk.S) drives the first
//! virtio-mmio slot through the handshake, writes a known pattern to sector 1 and reads it
//! back, with QueueNotify going through the ioeventfd to the device event loop and completions
//! coming back as interrupts (irqfd with the in-kernel irqchip, the userspace IOAPIC in split
//! mode). Checks what the guest reports and what reached (or did not reach) the image file for
//! read-write, overlay and read-only disks, and that the guest finds nothing without a disk.

#[path = "common/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use harness::{builder, can_run, guests, run_to_exit, Console, TestPort};
use smolvm::devices::virtio::block::{DiskImage, DiskMode, OverlayTarget};
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder};

/// Guest runs in this file one at a time (the host emulates guest CPL0 code; keep timings
/// predictable).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Size of the test images.
const IMAGE_LEN: usize = 1 << 20;
/// Every byte of a fresh test image.
const FILL: u8 = 0x5a;
/// Bytes per sector.
const SECTOR_LEN: usize = 512;

/// What the guest reports on the test port when everything works.
const ALL_OK: [u32; 3] = [
    guests::VIRTIO_BLK_WRITE_STATUS,
    guests::VIRTIO_BLK_READ_STATUS,
    guests::VIRTIO_BLK_COMPARE,
];

/// A 1 MiB image file filled with [`FILL`], removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "smolvm-test-virtio-blk-{tag}-{}.img",
            std::process::id()
        ));
        std::fs::write(&path, vec![FILL; IMAGE_LEN]).expect("create test image");
        TempImage(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("read test image")
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// FNV-1a, 64 bit, of `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The image as it must be after the guest's write reached it: the pattern in sector 1,
/// [`FILL`] everywhere else.
fn expected_after_write() -> Vec<u8> {
    let mut v = vec![FILL; IMAGE_LEN];
    let start = guests::VIRTIO_BLK_SECTOR as usize * SECTOR_LEN;
    v[start..start + SECTOR_LEN].copy_from_slice(&guests::virtio_blk_pattern());
    v
}

/// Starts the VM and waits (with the watchdog) for it to end.
fn run(b: VmBuilder, console: &Console) -> ExitReason {
    let vm = b.start().expect("start");
    run_to_exit(&vm, console)
}

/// Runs the guest with `disk` as its only block device and returns its console and port.
fn run_with_disk(disk: DiskImage, irqchip: IrqchipMode) -> (ExitReason, Console, TestPort) {
    let (b, console, port) = builder("virtio_blk");
    let exit = run(b.irqchip(irqchip).block_device(disk), &console);
    (exit, console, port)
}

/// Read-write disk: the guest's write reaches the image file, exactly sector 1.
fn read_write_disk(irqchip: IrqchipMode, tag: &str) {
    let image = TempImage::new(tag);
    let disk = DiskImage::open(image.path(), DiskMode::ReadWrite).expect("open disk");
    let (exit, console, port) = run_with_disk(disk, irqchip);
    assert_eq!(exit, ExitReason::Reset, "console: {:?}", console.text());
    assert_eq!(console.text(), guests::VIRTIO_BLK_OK_OUTPUT);
    assert_eq!(port.values(), ALL_OK);
    let after = image.contents();
    assert_eq!(after.len(), IMAGE_LEN);
    let sector = guests::VIRTIO_BLK_SECTOR as usize * SECTOR_LEN..;
    assert_eq!(
        &after[sector.start..sector.start + SECTOR_LEN],
        &guests::virtio_blk_pattern()[..],
        "sector 1 of the image holds the guest's pattern"
    );
    assert!(
        after == expected_after_write(),
        "bytes outside sector 1 changed"
    );
}

#[test]
fn guest_writes_and_reads_back_a_read_write_disk() {
    let _g = serial();
    if !can_run() {
        return;
    }
    read_write_disk(IrqchipMode::InKernel, "rw");
}

#[test]
fn guest_writes_and_reads_back_with_split_irqchip() {
    let _g = serial();
    if !can_run() {
        return;
    }
    read_write_disk(IrqchipMode::Split, "rw-split");
}

#[test]
fn memory_overlay_keeps_guest_writes_off_the_base_image() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let image = TempImage::new("overlay");
    let before = checksum(&image.contents());
    let disk =
        DiskImage::open(image.path(), DiskMode::Overlay(OverlayTarget::Memory)).expect("open disk");
    let (exit, console, port) = run_with_disk(disk, IrqchipMode::InKernel);
    assert_eq!(exit, ExitReason::Reset, "console: {:?}", console.text());
    // The guest reads its own write back from the overlay...
    assert_eq!(console.text(), guests::VIRTIO_BLK_OK_OUTPUT);
    assert_eq!(port.values(), ALL_OK);
    // ...and the base image is untouched.
    let after = image.contents();
    assert_eq!(checksum(&after), before, "base image changed");
    assert!(after == vec![FILL; IMAGE_LEN], "base image changed");
}

#[test]
fn read_only_disk_fails_the_write_and_keeps_the_image() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let image = TempImage::new("ro");
    let before = checksum(&image.contents());
    let disk = DiskImage::open(image.path(), DiskMode::ReadOnly).expect("open disk");
    let (exit, console, port) = run_with_disk(disk, IrqchipMode::InKernel);
    assert_eq!(exit, ExitReason::Reset, "console: {:?}", console.text());
    assert_eq!(console.text(), guests::VIRTIO_BLK_FAILED_OUTPUT);
    // Write: VIRTIO_BLK_S_IOERR. Read: OK, but it returns the image's 0x5a bytes, so the
    // comparison with the pattern fails.
    assert_eq!(
        port.values(),
        [
            guests::VIRTIO_BLK_WRITE_STATUS | 1,
            guests::VIRTIO_BLK_READ_STATUS,
            guests::VIRTIO_BLK_COMPARE | 1,
        ]
    );
    let after = image.contents();
    assert_eq!(checksum(&after), before, "read-only image changed");
    assert!(after == vec![FILL; IMAGE_LEN], "read-only image changed");
}

#[test]
fn without_a_block_device_the_guest_finds_none() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, port) = builder("virtio_blk");
    assert_eq!(run(b, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::VIRTIO_BLK_NO_DEVICE_OUTPUT);
    assert!(port.values().is_empty(), "{:?}", port.values());
}

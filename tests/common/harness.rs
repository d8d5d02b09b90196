//! Shared helpers for tests that boot tiny guests through the public API.
//!
//! Every guest run has a watchdog: [`run_to_exit`] stops the VM and fails the test if the
//! guest does not finish in time, so a bug shows up as a failure, never a hung test.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smolvm::devices::BusDevice;
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder, VmHandle};

#[path = "guests.rs"]
pub mod guests;

/// How long any single guest may run before the watchdog fails the test.
pub const WATCHDOG: Duration = Duration::from_secs(20);

/// Whether these tests can run here. When they cannot, the reason is printed so the skip is
/// visible; with `SMOLVM_REQUIRE_KVM=1` (set by CI) a missing KVM or toolchain is a failure.
pub fn can_run() -> bool {
    let reason = if !std::path::Path::new("/dev/kvm").exists() {
        Some("/dev/kvm does not exist".to_string())
    } else {
        guests::available().err()
    };
    match reason {
        None => true,
        Some(r) => {
            if std::env::var_os("SMOLVM_REQUIRE_KVM").is_some() {
                panic!("SMOLVM_REQUIRE_KVM is set but guests cannot run: {r}");
            }
            eprintln!("SKIPPED: cannot boot tiny guests on this host: {r}");
            false
        }
    }
}

/// Collects everything the guest writes to its console.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the console contains `needle`; false on timeout.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

/// Records every 32-bit value the guest writes to the test port.
#[derive(Clone, Default)]
pub struct TestPort(pub Arc<Mutex<Vec<u32>>>);

impl TestPort {
    pub fn values(&self) -> Vec<u32> {
        self.0.lock().unwrap().clone()
    }
}

struct TestPortDevice(Arc<Mutex<Vec<u32>>>);

impl BusDevice for TestPortDevice {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.0.lock().unwrap().push(u32::from_le_bytes(b));
    }
}

/// Both interrupt-controller modes, for tests whose behaviour must not depend on it.
pub const IRQCHIP_MODES: [IrqchipMode; 2] = [IrqchipMode::InKernel, IrqchipMode::Split];

/// [`builder`] with the given interrupt-controller mode.
pub fn builder_in(name: &str, mode: IrqchipMode) -> (VmBuilder, Console, TestPort) {
    let (b, console, port) = builder(name);
    (b.irqchip(mode), console, port)
}

/// A builder for tiny guest `name` with its console and test port captured.
pub fn builder(name: &str) -> (VmBuilder, Console, TestPort) {
    let console = Console::default();
    let port = TestPort::default();
    let sink = console.0.clone();
    let b = VmBuilder::new()
        .memory_mib(64)
        .kernel(guests::guest(name))
        .console_callback(move |bytes| sink.lock().unwrap().extend_from_slice(bytes))
        .pio_device(
            guests::TEST_PORT,
            4,
            Arc::new(Mutex::new(TestPortDevice(port.0.clone()))),
        );
    (b, console, port)
}

/// Waits for the VM to end, with the watchdog.
pub fn run_to_exit(vm: &VmHandle, console: &Console) -> ExitReason {
    match vm.wait_timeout(WATCHDOG) {
        Some(r) => r,
        None => {
            let r = vm.stop();
            panic!(
                "watchdog: guest still running after {WATCHDOG:?} (stopped: {r}); console: {:?}",
                console.text()
            );
        }
    }
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Number of threads of this process.
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

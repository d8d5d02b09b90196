//! Boots the purpose-built tiny guests (guest/tiny/) through the public API on this host's
//! KVM and checks what the VM reports: exits, console output, port writes, SMP bring-up,
//! interrupts, pause/resume/stop, and that nothing leaks. Behaviour that must not depend on
//! the interrupt controller is checked in both `IrqchipMode`s; split-mode specifics are in
//! `split_irqchip.rs`.

#[path = "common/harness.rs"]
mod harness;

use std::sync::Mutex;
use std::time::Duration;

use harness::{builder, builder_in, can_run, guests, run_to_exit, IRQCHIP_MODES};
use smolvm::{ExitReason, VmState};

/// Tests that count threads and file descriptors must not overlap with other guest runs in
/// this process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn elf_guest_prints_and_resets() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("hello", mode);
        let vm = b.start().expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
        assert_eq!(console.text(), guests::HELLO_OUTPUT);
        assert!(matches!(vm.state(), VmState::Exited(ExitReason::Reset)));
    }
}

#[test]
fn minimal_guest_prints_with_rep_outsb_and_resets() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("hello_min", mode);
        let vm = b.start().expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
        assert_eq!(console.text(), guests::HELLO_OUTPUT);
    }
}

#[test]
fn pvh_guest_prints_and_resets() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("hello_pvh", mode);
        let vm = b.start().expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
        assert_eq!(console.text(), guests::HELLO_PVH_OUTPUT);
    }
}

#[test]
fn guest_power_off_is_reported() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("poweroff", mode);
        let vm = b.start().expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::PowerOff);
        assert_eq!(console.text(), guests::POWEROFF_OUTPUT);
    }
}

#[test]
fn guest_halting_for_good_is_reported() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("halt", mode);
        let vm = b
            .halt_probe(Some(Duration::from_millis(20)))
            .start()
            .expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::Halted);
        assert_eq!(console.text(), guests::HALT_OUTPUT);
    }
}

#[test]
fn triple_fault_is_reported_not_hung() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, _) = builder_in("triple_fault", mode);
        let vm = b.start().expect("start");
        assert_eq!(
            run_to_exit(&vm, &console),
            ExitReason::TripleFault { vcpu: 0 }
        );
        assert_eq!(console.text(), guests::TRIPLE_FAULT_OUTPUT);
    }
}

#[test]
fn all_vcpus_run() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        for n in [1u32, 2, 4] {
            let (b, console, port) = builder_in("smp", mode);
            let vm = b.vcpus(n).start().expect("start");
            assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset, "{n} vCPUs");
            assert_eq!(console.text(), guests::smp_output(n as usize), "{n} vCPUs");
            let mut ids = port.values();
            ids.sort_unstable();
            assert_eq!(
                ids,
                (0..n).collect::<Vec<_>>(),
                "APIC ids reported by {n} vCPUs"
            );
        }
    }
}

#[test]
fn pause_resume_stop_a_spinning_guest() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        let (b, console, port) = builder_in("spin", mode);
        let vm = b.start().expect("start");
        let beats = |min: usize| {
            let deadline = std::time::Instant::now() + harness::WATCHDOG;
            while port.values().len() < min {
                assert!(std::time::Instant::now() < deadline, "no heartbeat");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        beats(1);
        assert!(console.text().starts_with(guests::SPIN_OUTPUT));

        vm.pause().expect("pause");
        assert_eq!(vm.state(), VmState::Paused);
        let frozen = port.values().len();
        // Heartbeats come every ~100 ms here; a paused guest must produce none.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(port.values().len(), frozen, "guest ran while paused");

        vm.resume().expect("resume");
        assert_eq!(vm.state(), VmState::Running);
        beats(frozen + 2);
        let values = port.values();
        assert!(
            values.windows(2).all(|w| w[1] == w[0] + 1),
            "heartbeats must continue in order across the pause: {values:?}"
        );

        assert_eq!(vm.stop(), ExitReason::Stopped);
        assert!(matches!(vm.state(), VmState::Exited(ExitReason::Stopped)));
        assert!(vm.pause().is_err());
        assert!(vm.resume().is_err());
        // Stopping twice is harmless and keeps the first reason.
        assert_eq!(vm.stop(), ExitReason::Stopped);
    }
}

#[test]
fn stop_while_paused() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, port) = builder("spin");
    let vm = b.vcpus(2).start().expect("start");
    assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
    vm.pause().expect("pause");
    assert_eq!(vm.stop(), ExitReason::Stopped);
    let n = port.values().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(port.values().len(), n);
}

#[test]
fn irqfd_interrupt_reaches_guest_handler() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, port) = builder("irq");
    let vm = b.start().expect("start");
    assert!(
        console.wait_for(guests::IRQ_READY_OUTPUT, harness::WATCHDOG),
        "guest never got ready: {:?}",
        console.text()
    );
    assert!(port.values().is_empty(), "no interrupt was raised yet");
    let line = vm.interrupt_line(guests::IRQ_GSI).expect("interrupt line");
    line.trigger().expect("trigger");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(port.values(), vec![guests::IRQ_VECTOR]);
    assert!(
        console.text().ends_with(guests::IRQ_OK_OUTPUT),
        "{:?}",
        console.text()
    );
}

#[test]
fn console_input_reaches_the_uart() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("spin");
    let vm = b.start().expect("start");
    assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
    assert_eq!(vm.send_console_input(b"abc").expect("input"), 3);
    // The 16550 receive FIFO holds 64 bytes; the spinning guest never drains it.
    let big = [b'x'; 100];
    assert_eq!(vm.send_console_input(&big).expect("input"), 61);
    assert_eq!(vm.send_console_input(b"y").expect("input"), 0);
    vm.stop();
    assert!(vm.send_console_input(b"z").is_err());
}

#[test]
fn stop_leaves_no_threads_or_fds() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for mode in IRQCHIP_MODES {
        // Warm-up: the first VM opens the process-wide /dev/kvm handle, which stays open.
        let (b, console, _) = builder_in("hello", mode);
        let vm = b.start().expect("start");
        run_to_exit(&vm, &console);
        drop(vm);

        let (fds, threads) = (harness::open_fds(), harness::threads());
        for vcpus in [1, 3] {
            let (b, console, _) = builder_in("spin", mode);
            let vm = b.vcpus(vcpus).start().expect("start");
            assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
            assert!(harness::threads() >= threads + vcpus as usize);
            assert!(harness::open_fds() > fds);
            assert_eq!(vm.stop(), ExitReason::Stopped);
            assert_eq!(harness::threads(), threads, "threads left after stop()");
            assert_eq!(
                harness::open_fds(),
                fds,
                "file descriptors left after stop()"
            );
            drop(vm);
        }
        // The same after a guest-initiated exit and wait().
        let (b, console, _) = builder_in("hello", mode);
        let vm = b.vcpus(2).start().expect("start");
        assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
        assert_eq!(harness::threads(), threads);
        assert_eq!(harness::open_fds(), fds);
    }
}

#[test]
fn memory_above_the_mmio_gap() {
    let _g = serial();
    if !can_run() {
        return;
    }
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    // 4 GiB + 64 MiB: 3 GiB below the gap, the rest above 4 GiB. Reserved lazily, so cheap.
    let (b, console, _) = builder("hello");
    let vm = b.memory_mib(4096 + 64).start().expect("start");
    let mem = vm.memory().expect("memory");
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(
        regions,
        vec![(0, 0xc000_0000), (0x1_0000_0000, (1 << 30) + (64 << 20))]
    );
    // The zero page's e820 map (boot_params.e820_entries at 0x1e8, table at 0x2d0) must
    // describe the high RAM and nothing in the gap.
    let zero_page = 0x7000u64;
    let n: u8 = mem.read_obj(GuestAddress(zero_page + 0x1e8)).unwrap();
    let entries: Vec<(u64, u64, u32)> = (0..u64::from(n))
        .map(|i| {
            let at = GuestAddress(zero_page + 0x2d0 + i * 20);
            let addr: u64 = mem.read_obj(at).unwrap();
            let size: u64 = mem.read_obj(GuestAddress(at.0 + 8)).unwrap();
            let kind: u32 = mem.read_obj(GuestAddress(at.0 + 16)).unwrap();
            (addr, size, kind)
        })
        .collect();
    assert!(
        entries.contains(&(0x1_0000_0000, (1 << 30) + (64 << 20), 1)),
        "{entries:x?}"
    );
    for (addr, size, kind) in &entries {
        if *kind == 1 {
            assert!(
                addr + size <= 0xc000_0000 || *addr >= 0x1_0000_0000,
                "RAM in the MMIO gap: {entries:x?}"
            );
        }
    }
    drop(mem);
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::HELLO_OUTPUT);
}

#[test]
fn a_device_can_stop_the_vm_from_its_vcpu_thread() {
    let _g = serial();
    if !can_run() {
        return;
    }
    use smolvm::devices::BusDevice;
    use std::sync::{Arc, OnceLock};

    /// Stops the VM on the guest's first heartbeat, from inside the vCPU's exit handler.
    struct Stopper(Arc<OnceLock<Arc<smolvm::VmHandle>>>);
    impl BusDevice for Stopper {
        fn read(&mut self, _: u64, _: u64, d: &mut [u8]) {
            d.fill(0)
        }
        fn write(&mut self, _: u64, _: u64, _: &[u8]) {
            if let Some(vm) = self.0.get() {
                assert_eq!(vm.stop(), ExitReason::Stopped);
            }
        }
    }
    let slot = Arc::new(OnceLock::new());
    let vm = Arc::new(
        smolvm::VmBuilder::new()
            .memory_mib(64)
            .kernel(guests::guest("spin"))
            .pio_device(
                guests::TEST_PORT,
                4,
                Arc::new(Mutex::new(Stopper(slot.clone()))),
            )
            .start()
            .expect("start"),
    );
    slot.set(vm.clone()).ok().unwrap();
    let reason = vm.wait_timeout(harness::WATCHDOG);
    assert_eq!(reason, Some(ExitReason::Stopped));
    // Break the handle <-> device cycle so everything is released.
    drop(vm);
}

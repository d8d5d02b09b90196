//! The tiny guests booted with the split irqchip ([`IrqchipMode::Split`]: LAPIC in the kernel,
//! smolvm's userspace IOAPIC on the MMIO bus, no PIC/PIT) through the public API: the same
//! exits, output, SMP bring-up, interrupts (irqfd and `set_irq_line`), pause/resume/stop and
//! leak checks as `lifecycle.rs` for the default mode.

#[path = "common/harness.rs"]
mod harness;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::{can_run, guests, run_to_exit, Console, TestPort};
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder, VmState};

/// Tests that count threads and file descriptors must not overlap with other guest runs in
/// this process.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`harness::builder`] with the split irqchip.
fn builder(name: &str) -> (VmBuilder, Console, TestPort) {
    let (b, console, port) = harness::builder(name);
    (b.irqchip(IrqchipMode::Split), console, port)
}

#[test]
fn elf_guest_prints_and_resets() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("hello");
    let vm = b.start().expect("start");
    assert!(
        vm.ioapic().unwrap().is_some(),
        "split mode has a userspace IOAPIC"
    );
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::HELLO_OUTPUT);
    assert!(matches!(vm.state(), VmState::Exited(ExitReason::Reset)));
    assert!(vm.ioapic().is_err(), "released after exit");
}

#[test]
fn in_kernel_mode_has_no_userspace_ioapic() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = harness::builder("hello");
    let vm = b.irqchip(IrqchipMode::InKernel).start().expect("start");
    assert!(vm.ioapic().unwrap().is_none());
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
}

#[test]
fn minimal_and_pvh_guests() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("hello_min");
    let vm = b.start().expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::HELLO_OUTPUT);
    let (b, console, _) = builder("hello_pvh");
    let vm = b.start().expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(console.text(), guests::HELLO_PVH_OUTPUT);
}

#[test]
fn guest_power_off_is_reported() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("poweroff");
    let vm = b.start().expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::PowerOff);
    assert_eq!(console.text(), guests::POWEROFF_OUTPUT);
}

#[test]
fn guest_halting_for_good_is_reported() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("halt");
    let vm = b
        .halt_probe(Some(Duration::from_millis(20)))
        .start()
        .expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Halted);
    assert_eq!(console.text(), guests::HALT_OUTPUT);
}

#[test]
fn triple_fault_is_reported_not_hung() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _) = builder("triple_fault");
    let vm = b.start().expect("start");
    assert_eq!(
        run_to_exit(&vm, &console),
        ExitReason::TripleFault { vcpu: 0 }
    );
    assert_eq!(console.text(), guests::TRIPLE_FAULT_OUTPUT);
}

#[test]
fn all_vcpus_run() {
    let _g = serial();
    if !can_run() {
        return;
    }
    for n in [1u32, 2, 4] {
        let (b, console, port) = builder("smp");
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

/// Waits for the `irq` guest to program its IOAPIC pin, and checks what it programmed.
fn ready_irq_guest() -> (smolvm::VmHandle, Console, TestPort) {
    let (b, console, port) = builder("irq");
    let vm = b.start().expect("start");
    assert!(
        console.wait_for(guests::IRQ_READY_OUTPUT, harness::WATCHDOG),
        "guest never got ready: {:?}",
        console.text()
    );
    assert!(port.values().is_empty(), "no interrupt was raised yet");
    let ioapic = vm.ioapic().unwrap().expect("userspace IOAPIC");
    let io = ioapic.lock().unwrap();
    let rte = io
        .redirection_entry(guests::IRQ_GSI as usize)
        .expect("pin 10");
    assert_eq!(u32::from(rte.vector), guests::IRQ_VECTOR);
    assert!(!rte.masked && !rte.level_triggered && rte.destination == 0);
    assert_eq!(
        io.routes().len(),
        1,
        "only pin 10 is routed: {:?}",
        io.routes()
    );
    (vm, console, port)
}

fn assert_irq_handled(vm: &smolvm::VmHandle, console: &Console, port: &TestPort) {
    assert_eq!(run_to_exit(vm, console), ExitReason::Reset);
    assert_eq!(port.values(), vec![guests::IRQ_VECTOR]);
    assert!(
        console.text().ends_with(guests::IRQ_OK_OUTPUT),
        "{:?}",
        console.text()
    );
}

#[test]
fn irqfd_interrupt_reaches_guest_handler() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (vm, console, port) = ready_irq_guest();
    let line = vm.interrupt_line(guests::IRQ_GSI).expect("interrupt line");
    line.trigger().expect("trigger");
    assert_irq_handled(&vm, &console, &port);
}

#[test]
fn irq_line_interrupt_reaches_guest_handler() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (vm, console, port) = ready_irq_guest();
    let v = vm.vm().unwrap();
    v.set_irq_line(guests::IRQ_GSI, true).unwrap();
    v.set_irq_line(guests::IRQ_GSI, false).unwrap();
    drop(v);
    assert_irq_handled(&vm, &console, &port);
}

#[test]
fn ioapic_line_api_reaches_guest_handler() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (vm, console, port) = ready_irq_guest();
    let ioapic = vm.ioapic().unwrap().unwrap();
    ioapic
        .lock()
        .unwrap()
        .set_line(guests::IRQ_GSI, true)
        .unwrap();
    drop(ioapic);
    assert_irq_handled(&vm, &console, &port);
}

#[test]
fn level_triggered_eoi_comes_back_to_the_ioapic() {
    let _g = serial();
    if !can_run() {
        return;
    }
    use smolvm::devices::BusDevice;
    let (vm, console, port) = ready_irq_guest();
    let ioapic = vm.ioapic().unwrap().unwrap();
    {
        let mut io = ioapic.lock().unwrap();
        // Reprogram pin 10 as level-triggered (what the guest would do for a level device).
        let base = 0xfec0_0000;
        io.write(base, 0x00, &(0x10 + 2 * guests::IRQ_GSI).to_le_bytes());
        io.write(base, 0x10, &(guests::IRQ_VECTOR | 1 << 15).to_le_bytes());
        assert!(io.redirection_entry(10).unwrap().level_triggered);
        // A short level pulse: delivered once, remote IRR set until the guest's EOI.
        io.set_line(guests::IRQ_GSI, true).unwrap();
        io.set_line(guests::IRQ_GSI, false).unwrap();
        assert!(io.redirection_entry(10).unwrap().remote_irr);
    }
    assert_irq_handled(&vm, &console, &port);
    // The guest's LAPIC EOI came back as VmExit::IoapicEoi and cleared remote IRR.
    assert!(
        !ioapic
            .lock()
            .unwrap()
            .redirection_entry(10)
            .unwrap()
            .remote_irr
    );
}

#[test]
fn pause_resume_stop_a_spinning_guest() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, port) = builder("spin");
    let vm = b.start().expect("start");
    let beats = |min: usize| {
        let deadline = Instant::now() + harness::WATCHDOG;
        while port.values().len() < min {
            assert!(Instant::now() < deadline, "no heartbeat");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    beats(1);
    assert!(console.text().starts_with(guests::SPIN_OUTPUT));

    vm.pause().expect("pause");
    assert_eq!(vm.state(), VmState::Paused);
    let frozen = port.values().len();
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
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn stop_leaves_no_threads_or_fds() {
    let _g = serial();
    if !can_run() {
        return;
    }
    // Warm-up: the first VM opens the process-wide /dev/kvm handle, which stays open.
    let (b, console, _) = builder("hello");
    let vm = b.start().expect("start");
    run_to_exit(&vm, &console);
    drop(vm);

    let (fds, threads) = (harness::open_fds(), harness::threads());
    for vcpus in [1, 3] {
        let (b, console, _) = builder("spin");
        let vm = b.vcpus(vcpus).start().expect("start");
        assert!(console.wait_for(guests::SPIN_OUTPUT, harness::WATCHDOG));
        assert!(harness::threads() >= threads + vcpus as usize);
        assert!(harness::open_fds() > fds);
        let t = Instant::now();
        assert_eq!(vm.stop(), ExitReason::Stopped);
        eprintln!(
            "split irqchip: stop() of {vcpus} vCPUs took {:?}",
            t.elapsed()
        );
        assert_eq!(harness::threads(), threads, "threads left after stop()");
        assert_eq!(
            harness::open_fds(),
            fds,
            "file descriptors left after stop()"
        );
        drop(vm);
    }
    // The same after a guest-initiated exit and wait().
    let (b, console, _) = builder("hello");
    let vm = b.vcpus(2).start().expect("start");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(harness::threads(), threads);
    assert_eq!(harness::open_fds(), fds);
}

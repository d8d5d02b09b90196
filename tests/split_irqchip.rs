//! What is specific to the split irqchip ([`IrqchipMode::Split`]: LAPIC in the kernel,
//! smolvm's userspace IOAPIC on the MMIO bus, no PIC/PIT): the IOAPIC's presence and the
//! routes the guest programs, interrupts raised through irqfd, `set_irq_line` and the IOAPIC's
//! own line API, and level-triggered EOIs. Exits, SMP bring-up, pause/resume/stop and leak
//! checks run in both modes in `lifecycle.rs`.

#[path = "common/harness.rs"]
mod harness;

use std::sync::Mutex;

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

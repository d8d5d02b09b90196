//! The hypervisor traits on this host's KVM, driven directly with tiny real-mode programs:
//! memory slots, ioeventfd, exits with data, failures with instruction bytes, MSIs and IRQ
//! lines.

#[path = "common/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::{builder, can_run, guests, run_to_exit};
use smolvm::hypervisor::{
    self, EventFd, IoEventAddress, IrqchipMode, MemoryRegion, Msi, Vcpu, Vm, VmExit,
};
use smolvm::memory::{self, GuestMemory};
use smolvm::ExitReason;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const CODE: u64 = 0x1000;

/// A VM with one page of code at CODE (slot 0, [0, 0x2000)) and a data page at 0x2000
/// (slot 1), and one vCPU in real mode about to run CODE.
struct RealMode {
    vm: Arc<dyn Vm>,
    mem: GuestMemory,
    vcpu: Box<dyn Vcpu>,
}

fn region(mem: &GuestMemory, slot: u32, start: u64, size: u64) -> MemoryRegion {
    MemoryRegion {
        slot,
        guest_addr: start,
        size,
        host_addr: mem.get_host_address(GuestAddress(start)).unwrap() as u64,
        read_only: false,
    }
}

fn real_mode(code: &[u8]) -> RealMode {
    let hv = hypervisor::open().expect("open KVM");
    let mem = memory::create(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x1000)])
        .expect("memory");
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let vm = hv.create_vm().expect("create VM");
    // SAFETY: `mem` is kept in the returned struct, dropped after the VM's users.
    unsafe {
        vm.map_memory(region(&mem, 0, 0, 0x2000)).unwrap();
        vm.map_memory(region(&mem, 1, 0x2000, 0x1000)).unwrap();
    }
    vm.create_irqchip(IrqchipMode::InKernel).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut s = vcpu.special_regs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    s.ds.base = 0;
    s.ds.selector = 0;
    vcpu.set_special_regs(&s).unwrap();
    let mut r = vcpu.regs().unwrap();
    r.rip = CODE;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();
    RealMode { vm, mem, vcpu }
}

/// Runs until an exit other than `Interrupted`, describing it as text.
fn next_exit(vcpu: &mut dyn Vcpu) -> String {
    loop {
        match vcpu.run().expect("run") {
            VmExit::Interrupted => continue,
            other => return format!("{other:?}"),
        }
    }
}

#[test]
fn memory_slots_map_and_unmap() {
    if !can_run() {
        return;
    }
    // mov al, [0x2000] ; out 0x80, al ; hlt
    let mut g = real_mode(&[0xa0, 0x00, 0x20, 0xe6, 0x80, 0xf4]);
    g.mem.write_obj(0x5au8, GuestAddress(0x2000)).unwrap();
    match g.vcpu.run().unwrap() {
        VmExit::IoOut { port, size, data } => {
            assert_eq!((port, size, data.to_vec()), (0x80, 1, vec![0x5a]));
        }
        other => panic!("expected the out, got {other:?}"),
    }

    // Without slot 1 the same load becomes an MMIO read the VMM answers.
    g.vm.unmap_memory(region(&g.mem, 1, 0x2000, 0x1000))
        .unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rip = CODE;
    g.vcpu.set_regs(&r).unwrap();
    match g.vcpu.run().unwrap() {
        VmExit::MmioRead { addr, data } => {
            assert_eq!((addr, data.len()), (0x2000, 1));
            data[0] = 0x77;
        }
        other => panic!("expected an MMIO read, got {other:?}"),
    }
    match g.vcpu.run().unwrap() {
        VmExit::IoOut { port, data, .. } => assert_eq!((port, data.to_vec()), (0x80, vec![0x77])),
        other => panic!("expected the out, got {other:?}"),
    }
}

#[test]
fn ioeventfd_swallows_the_exit_and_signals() {
    if !can_run() {
        return;
    }
    // out 0x80, al ; mov [0x3000], al ; out 0x81, al ; hlt
    let mut g = real_mode(&[0xe6, 0x80, 0xa2, 0x00, 0x30, 0xe6, 0x81, 0xf4]);
    let pio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mmio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    g.vm.register_ioeventfd(&pio, IoEventAddress::Pio(0x80), None)
        .unwrap();
    g.vm.register_ioeventfd(&mmio, IoEventAddress::Mmio(0x3000), None)
        .unwrap();
    let exit = next_exit(g.vcpu.as_mut());
    assert!(
        exit.contains("IoOut") && exit.contains("port: 129"),
        "{exit}"
    );
    assert_eq!(pio.read().unwrap(), 1);
    assert_eq!(mmio.read().unwrap(), 1);

    // Unregistered, the first out exits again.
    g.vm.unregister_ioeventfd(&pio, IoEventAddress::Pio(0x80), None)
        .unwrap();
    let mut r = g.vcpu.regs().unwrap();
    r.rip = CODE;
    g.vcpu.set_regs(&r).unwrap();
    let exit = next_exit(g.vcpu.as_mut());
    assert!(
        exit.contains("IoOut") && exit.contains("port: 128"),
        "{exit}"
    );
}

#[test]
fn kicked_vcpu_returns_interrupted() {
    if !can_run() {
        return;
    }
    // jmp $ (spin forever)
    let mut g = real_mode(&[0xeb, 0xfe]);
    let kick = g.vcpu.kicker();
    // A kick before run makes the next run return at once (immediate_exit).
    kick.kick();
    assert!(matches!(g.vcpu.run().unwrap(), VmExit::Interrupted));
    let k = kick.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        k.kick();
    });
    assert!(matches!(g.vcpu.run().unwrap(), VmExit::Interrupted));
    t.join().unwrap();
    // Kicks do not accumulate: after one Interrupted the guest runs again.
    let rip_before = g.vcpu.regs().unwrap().rip;
    assert_eq!(rip_before, CODE);
    drop(g.vcpu);
    // A kick after the vCPU is gone is a no-op, not a crash.
    kick.kick();
    drop(g.vm);
    drop(g.mem);
}

#[test]
fn guest_failure_ends_the_vm_with_details() {
    if !can_run() {
        return;
    }
    let hv = hypervisor::open().unwrap();
    if !hv.capabilities().software_virtualization {
        eprintln!("SKIPPED: needs a software KVM (kvm_pvm) that fails on int3");
        return;
    }
    // A 64-bit ELF whose first instruction is int3 (kernel-mode software interrupts are not
    // emulated by kvm_pvm): the VM must end with GuestFailure carrying the details.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("int3.S");
    std::fs::write(
        &src,
        ".section .text.start,\"ax\"\n.globl _start\n_start: int3\n hlt\n",
    )
    .unwrap();
    let elf = dir.join("int3.elf");
    let st = std::process::Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"])
        .arg(format!(
            "-Wl,-T,{}",
            guests::source_dir().join("link.ld").display()
        ))
        .arg("-o")
        .arg(&elf)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let vm = smolvm::VmBuilder::new().kernel(&elf).start().unwrap();
    match vm.wait_timeout(harness::WATCHDOG).expect("watchdog") {
        ExitReason::GuestFailure { vcpu: 0, failure } => {
            assert_eq!(failure.suberror, Some(1), "{failure}");
            assert_eq!(failure.pc, Some(0x100000), "{failure}");
            if hv.capabilities().emulation_failure_details {
                assert_eq!(failure.instruction.first(), Some(&0xcc), "{failure}");
            }
            assert!(failure.to_string().contains("emulation"), "{failure}");
        }
        other => panic!("expected a guest failure, got {other}"),
    }
}

#[test]
fn msi_and_irq_line_reach_the_guest() {
    if !can_run() {
        return;
    }
    // MSI straight to the LAPIC (vector 0x40, fixed, APIC 0).
    let (b, console, port) = builder("irq");
    let vm = b.start().expect("start");
    assert!(console.wait_for(guests::IRQ_READY_OUTPUT, harness::WATCHDOG));
    vm.vm()
        .unwrap()
        .signal_msi(Msi {
            address: 0xfee0_0000,
            data: guests::IRQ_VECTOR,
            devid: None,
        })
        .expect("signal MSI");
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(port.values(), vec![guests::IRQ_VECTOR]);

    // An edge on the IOAPIC pin through KVM_IRQ_LINE.
    let (b, console, port) = builder("irq");
    let vm = b.start().expect("start");
    assert!(console.wait_for(guests::IRQ_READY_OUTPUT, harness::WATCHDOG));
    let v = vm.vm().unwrap();
    v.set_irq_line(guests::IRQ_GSI, true).unwrap();
    v.set_irq_line(guests::IRQ_GSI, false).unwrap();
    drop(v);
    assert_eq!(run_to_exit(&vm, &console), ExitReason::Reset);
    assert_eq!(port.values(), vec![guests::IRQ_VECTOR]);
}

//! Boot phases, measured one by one, plus the floor: the raw KVM ioctls any VMM must issue.
//!
//! Run with `cargo bench --bench boot_phases`. Needs `/dev/kvm` and gcc (for the tiny guest).
//! The README quotes the medians; `floor/raw_ioctls` and `phases/create_to_first_exit` are
//! measured in the same run so their ratio is meaningful on a noisy machine.

#[path = "../tests/common/guests.rs"]
mod guests;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use smolvm::hypervisor::{self, CpuConfig, IrqchipMode, MemoryRegion, Vm, VmExit};
use smolvm::memory::{self, GuestMemory};
use smolvm::{boot, ExitReason, VmBuilder};

const MEM: usize = 128 << 20;

fn guest_memory() -> GuestMemory {
    memory::create(&[(GuestAddress(0), MEM)]).unwrap()
}

fn map(vm: &dyn Vm, mem: &GuestMemory) {
    for (slot, r) in mem.iter().enumerate() {
        let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
        // SAFETY: `mem` outlives the VM in every bench below (dropped after it).
        unsafe {
            vm.map_memory(MemoryRegion {
                slot: slot as u32,
                guest_addr: r.start_addr().0,
                size: r.len(),
                host_addr: host,
                read_only: false,
            })
        }
        .unwrap();
    }
}

/// A vmlinux-sized ELF: one 20 MiB PT_LOAD at 16 MiB, filled with non-zero bytes.
fn big_elf() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-vmlinux-20m.elf");
    const SIZE: usize = 20 << 20;
    if std::fs::metadata(&path).map(|m| m.len() as usize).ok() == Some(SIZE + 0x1000) {
        return path;
    }
    let mut hdr = vec![0u8; 0x1000];
    hdr[..4].copy_from_slice(b"\x7fELF");
    hdr[4] = 2; // 64-bit
    hdr[5] = 1; // little endian
    hdr[6] = 1; // version
    hdr[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    hdr[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    hdr[20..24].copy_from_slice(&1u32.to_le_bytes());
    hdr[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
    hdr[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    hdr[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    hdr[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    hdr[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut hdr[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(SIZE as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(SIZE as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x20_0000u64.to_le_bytes()); // p_align
    let mut f = File::create(&path).unwrap();
    f.write_all(&hdr).unwrap();
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8 | 1).collect();
    f.write_all(&body).unwrap();
    path
}

/// The floor: the raw ioctls to get any guest instruction executed and back — KVM_CREATE_VM,
/// one memory slot, KVM_CREATE_VCPU, minimal (real-mode) registers, KVM_RUN to an `out`.
fn floor(c: &mut Criterion) {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    let kvm = Kvm::new().unwrap();
    c.bench_function("floor/raw_ioctls", |b| {
        b.iter_batched(
            guest_memory,
            |mem| {
                // `out %al, $0x80` at 0x1000.
                vm_memory::Bytes::write_slice(&mem, &[0xe6, 0x80], GuestAddress(0x1000)).unwrap();
                let vm = kvm.create_vm().unwrap();
                let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
                let region = kvm_userspace_memory_region {
                    slot: 0,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: MEM as u64,
                    userspace_addr: host,
                };
                // SAFETY: `mem` outlives `vm` (dropped at the end of this closure, after it).
                unsafe { vm.set_user_memory_region(region) }.unwrap();
                let mut vcpu = vm.create_vcpu(0).unwrap();
                let mut sregs = vcpu.get_sregs().unwrap();
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                vcpu.set_sregs(&sregs).unwrap();
                let mut regs = vcpu.get_regs().unwrap();
                regs.rip = 0x1000;
                regs.rflags = 2;
                vcpu.set_regs(&regs).unwrap();
                match vcpu.run().unwrap() {
                    VcpuExit::IoOut(0x80, _) => {}
                    other => panic!("unexpected exit {other:?}"),
                }
                // Returned, so the (slow, kernel-side) VM destruction happens after the
                // timed section, as in the smolvm variants.
                (vcpu, vm, mem)
            },
            BatchSize::PerIteration,
        )
    });
}

fn phases(c: &mut Criterion) {
    let hv = hypervisor::open().unwrap();
    // The smallest guest: its first exit comes after three instructions, so guest work
    // (emulated on kvm_pvm hosts) stays out of the VMM measurements.
    let hello = guests::guest("hello_min");
    let spin = guests::guest("spin");
    let big = big_elf();

    let mut g = c.benchmark_group("phases");

    g.bench_function("create_vm_map_128m", |b| {
        b.iter(|| {
            let mem = guest_memory();
            let vm = hv.create_vm().unwrap();
            map(vm.as_ref(), &mem);
            (vm, mem)
        })
    });

    let mem = guest_memory();
    g.bench_function("load_elf_20m", |b| {
        b.iter(|| boot::load_kernel(&mem, &big).unwrap())
    });
    drop(mem);

    g.bench_function("configure_vcpu", |b| {
        b.iter_batched(
            || {
                let mem = guest_memory();
                let vm = hv.create_vm().unwrap();
                map(vm.as_ref(), &mem);
                vm.create_irqchip(IrqchipMode::InKernel).unwrap();
                let k = boot::load_kernel(&mem, &hello).unwrap();
                let state = smolvm::arch::x86_64::configure_system(
                    &mem,
                    &k,
                    &boot::KernelCmdline::default(),
                    None,
                    1,
                )
                .unwrap();
                (vm, mem, state)
            },
            |(vm, mem, state)| {
                let mut vcpu = vm.create_vcpu(0).unwrap();
                vcpu.configure(&CpuConfig { id: 0, count: 1 }).unwrap();
                vcpu.set_boot_state(&state).unwrap();
                (vcpu, vm, mem)
            },
            BatchSize::PerIteration,
        )
    });

    // The same work as the floor, done through smolvm's layers with everything a Linux boot
    // needs (irqchip, PIT, CPUID, MSRs, FPU, LAPIC, page tables, zero page, MP table).
    for (name, mode) in [
        ("create_to_first_exit", IrqchipMode::InKernel),
        ("create_to_first_exit_split", IrqchipMode::Split),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                guest_memory,
                |mem| {
                    let vm = hv.create_vm().unwrap();
                    map(vm.as_ref(), &mem);
                    vm.create_irqchip(mode).unwrap();
                    let k = boot::load_kernel(&mem, &hello).unwrap();
                    let state = smolvm::arch::x86_64::configure_system(
                        &mem,
                        &k,
                        &boot::KernelCmdline::default(),
                        None,
                        1,
                    )
                    .unwrap();
                    let mut vcpu = vm.create_vcpu(0).unwrap();
                    vcpu.configure(&CpuConfig { id: 0, count: 1 }).unwrap();
                    vcpu.set_boot_state(&state).unwrap();
                    match vcpu.run().unwrap() {
                        VmExit::IoIn { .. } | VmExit::IoOut { .. } => {}
                        other => panic!("unexpected first exit {other:?}"),
                    }
                    (vcpu, vm, mem)
                },
                BatchSize::PerIteration,
            )
        });
    }

    // Both irqchip modes: with the split irqchip (LAPIC in the kernel, userspace IOAPIC, no
    // PIC/PIT) VM teardown skips the in-kernel I/O-bus devices' SRCU grace periods.
    for (suffix, mode) in [("", IrqchipMode::InKernel), ("_split", IrqchipMode::Split)] {
        g.bench_function(format!("lifecycle_tiny_guest{suffix}"), |b| {
            b.iter(|| {
                let out = Arc::new(std::sync::Mutex::new(Vec::new()));
                let o = out.clone();
                let vm = VmBuilder::new()
                    .hypervisor(hv.clone())
                    .irqchip(mode)
                    .kernel(&hello)
                    .console_callback(move |d| o.lock().unwrap().extend_from_slice(d))
                    .start()
                    .unwrap();
                assert_eq!(vm.wait(), ExitReason::Reset);
                assert_eq!(
                    out.lock().unwrap().as_slice(),
                    guests::HELLO_OUTPUT.as_bytes()
                );
            })
        });

        g.bench_function(format!("teardown_stop_running_vm{suffix}"), |b| {
            b.iter_batched(
                || {
                    let vm = VmBuilder::new()
                        .hypervisor(hv.clone())
                        .irqchip(mode)
                        .kernel(&spin)
                        .start()
                        .unwrap();
                    // Let the guest get going so stop() has to interrupt real guest execution.
                    std::thread::sleep(Duration::from_millis(2));
                    vm
                },
                |vm| {
                    assert_eq!(vm.stop(), ExitReason::Stopped);
                    drop(vm);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = floor, phases
}
criterion_main!(benches);

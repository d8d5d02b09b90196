//! The vCPU threads: create the vCPU on its own thread, then run guest code and handle its
//! exits until the VM stops.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::control::Control;
use super::ExitReason;
use crate::devices::legacy::Ioapic;
use crate::devices::Bus;
use crate::hypervisor::{CpuConfig, HypervisorError, Vcpu, VcpuKick, Vm, VmExit};

#[cfg(target_arch = "aarch64")]
use crate::hypervisor::arch::aarch64::BootState;
#[cfg(target_arch = "x86_64")]
use crate::hypervisor::arch::x86_64::BootState;

/// Everything a vCPU thread needs.
pub(super) struct VcpuContext {
    pub id: u32,
    pub count: u32,
    pub vm: Arc<dyn Vm>,
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub boot: Option<BootState>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// The userspace IOAPIC in split-irqchip mode; `None` with the in-kernel irqchip.
    pub ioapic: Option<Arc<Mutex<Ioapic>>>,
    pub control: Arc<Control>,
}

/// Rendezvous between the builder and the vCPU threads during start-up: every thread reports
/// its vCPU (or the error creating it), then waits for the go/abort decision.
pub(super) struct Startup {
    state: Mutex<StartupState>,
    cv: Condvar,
}

struct StartupState {
    reports: Vec<Option<Result<Arc<dyn VcpuKick>, HypervisorError>>>,
    go: Option<bool>,
}

impl Startup {
    pub fn new(vcpus: u32) -> Arc<Self> {
        Arc::new(Startup {
            state: Mutex::new(StartupState {
                reports: (0..vcpus).map(|_| None).collect(),
                go: None,
            }),
            cv: Condvar::new(),
        })
    }

    fn report(&self, id: u32, r: Result<Arc<dyn VcpuKick>, HypervisorError>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = s.reports.get_mut(id as usize) {
            *slot = Some(r);
        }
        self.cv.notify_all();
    }

    /// Builder side: waits until `expected` threads reported (fewer if some never started).
    pub fn collect(&self, expected: usize) -> Vec<Result<Arc<dyn VcpuKick>, HypervisorError>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.reports.iter().take(expected).any(Option::is_none) {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.reports
            .iter_mut()
            .take(expected)
            .filter_map(Option::take)
            .collect()
    }

    /// Builder side: lets the threads run (`true`) or tells them to give up (`false`).
    pub fn decide(&self, go: bool) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).go = Some(go);
        self.cv.notify_all();
    }

    fn wait_decision(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(go) = s.go {
                return go;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Starts the thread for vCPU `ctx.id`.
pub(super) fn spawn(ctx: VcpuContext, startup: Arc<Startup>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("smolvm-vcpu{}", ctx.id))
        // Exit handling is shallow; a small stack keeps per-VM memory down.
        .stack_size(256 * 1024)
        .spawn(move || {
            let vcpu = match create(&ctx) {
                Ok(v) => {
                    startup.report(ctx.id, Ok(v.kicker()));
                    v
                }
                Err(e) => {
                    startup.report(ctx.id, Err(e));
                    return;
                }
            };
            if startup.wait_decision() {
                let run =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(vcpu, &ctx)));
                if run.is_err() {
                    ctx.control.request_exit(ExitReason::VmmError {
                        vcpu: Some(ctx.id),
                        message: "vCPU thread panicked (a VMM bug; please report it)".into(),
                    });
                }
            }
            ctx.control.vcpu_finished();
        })
}

fn create(ctx: &VcpuContext) -> Result<Box<dyn Vcpu>, HypervisorError> {
    let mut vcpu = ctx.vm.create_vcpu(ctx.id)?;
    vcpu.configure(&CpuConfig {
        id: ctx.id,
        count: ctx.count,
    })?;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if let Some(boot) = &ctx.boot {
        vcpu.set_boot_state(boot)?;
    }
    Ok(vcpu)
}

fn run_loop(mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext) {
    let control = &ctx.control;
    let mut answered_probe = 0;
    loop {
        if control.should_stop() {
            return;
        }
        if control.is_paused() {
            control.park_while_paused();
            continue;
        }
        if let Some(generation) = control.pending_probe(answered_probe) {
            let halted = vcpu.is_halted_for_good().unwrap_or(false);
            control.answer_probe(ctx.id, generation, halted);
            answered_probe = generation;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                control.request_exit(ExitReason::VmmError {
                    vcpu: Some(ctx.id),
                    message: e.to_string(),
                });
                return;
            }
        };
        let reason = match exit {
            VmExit::IoIn { port, size, data } => {
                for chunk in data.chunks_mut(size) {
                    ctx.pio.read(u64::from(port), chunk);
                }
                continue;
            }
            VmExit::IoOut { port, size, data } => {
                for chunk in data.chunks(size) {
                    ctx.pio.write(u64::from(port), chunk);
                }
                continue;
            }
            VmExit::MmioRead { addr, data } => {
                ctx.mmio.read(addr, data);
                continue;
            }
            VmExit::MmioWrite { addr, data } => {
                ctx.mmio.write(addr, data);
                continue;
            }
            VmExit::Interrupted => continue,
            VmExit::IoapicEoi { vector } => {
                // Only the split irqchip exits for EOIs; with the in-kernel one there is
                // nothing to do.
                if let Some(ioapic) = &ctx.ioapic {
                    let mut ioapic = ioapic.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = ioapic.end_of_interrupt(vector) {
                        log::error!("IOAPIC EOI of vector {vector:#x}: {e}");
                    }
                }
                continue;
            }
            VmExit::Halt => {
                // Only backends without an in-kernel interrupt controller get here: a final
                // halt ends a single-vCPU VM; otherwise wait for the next interrupt to be
                // injected by re-entering the guest a little later.
                if ctx.count == 1 && vcpu.is_halted_for_good().unwrap_or(false) {
                    ExitReason::Halted
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                    continue;
                }
            }
            VmExit::Shutdown => ExitReason::TripleFault { vcpu: ctx.id },
            VmExit::PowerOff => ExitReason::PowerOff,
            VmExit::Reset => ExitReason::Reset,
            VmExit::Failure(mut failure) => {
                if failure.pc.is_none() {
                    failure.pc = guest_pc(vcpu.as_ref());
                }
                ExitReason::GuestFailure {
                    vcpu: ctx.id,
                    failure,
                }
            }
        };
        control.request_exit(reason);
        return;
    }
}

#[cfg(target_arch = "x86_64")]
fn guest_pc(vcpu: &dyn Vcpu) -> Option<u64> {
    vcpu.regs().ok().map(|r| r.rip)
}

#[cfg(not(target_arch = "x86_64"))]
fn guest_pc(_vcpu: &dyn Vcpu) -> Option<u64> {
    None
}

//! [`Vcpu`] on KVM: running the guest and translating KVM exits into [`VmExit`].

use std::sync::Arc;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

#[cfg(target_arch = "aarch64")]
use super::aarch64 as arch;
#[cfg(target_arch = "x86_64")]
use super::{err, x86_64 as arch};
use super::{kick::KvmKick, vm::ArchVcpuInput};
#[cfg(target_arch = "aarch64")]
use crate::hypervisor::arch::aarch64::BootState;
#[cfg(target_arch = "x86_64")]
use crate::hypervisor::arch::x86_64::{BootState, Registers, SpecialRegisters};
use crate::hypervisor::{CpuConfig, ExitFailure, Result, Vcpu, VcpuKick, VmExit};

/// A KVM vCPU.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{kvm::Kvm, CpuConfig, Hypervisor};
/// let vm = Kvm::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// // A `KvmVcpu`, used through the backend-neutral `Vcpu` trait.
/// let mut vcpu = vm.create_vcpu(0)?;
/// vcpu.configure(&CpuConfig { id: 0, count: 1 })?;
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    /// x86: the VM's CPUID template; arm64: the preferred `KVM_ARM_VCPU_INIT` target.
    arch: ArchVcpuInput,
    kick: Arc<KvmKick>,
    /// The kvm_run area, for the exit details kvm-ioctls does not decode.
    run: *mut kvm_run,
    /// The thread last registered with the kick target (avoids a lock per `run`).
    thread: Option<libc::pthread_t>,
}

impl KvmVcpu {
    pub(super) fn new(mut fd: VcpuFd, id: u32, arch: ArchVcpuInput) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points into the vCPU's kvm_run mapping, valid for `fd`'s lifetime;
        // taking a field address does not read it.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        KvmVcpu {
            fd,
            id,
            arch,
            kick: Arc::new(KvmKick::new(immediate_exit)),
            run,
            thread: None,
        }
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Before the run area is unmapped and before the owning thread can end.
        self.kick.detach();
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    #[cfg(target_arch = "x86_64")]
    fn configure(&mut self, config: &CpuConfig) -> Result<()> {
        arch::configure_cpu(&self.fd, &self.arch, config)
    }

    #[cfg(target_arch = "aarch64")]
    fn configure(&mut self, config: &CpuConfig) -> Result<()> {
        arch::init_vcpu(&self.fd, &self.arch, config)
    }

    #[cfg(target_arch = "aarch64")]
    fn set_boot_state(&mut self, state: &BootState) -> Result<()> {
        arch::set_boot_state(&self.fd, state)
    }

    /// arm64: WFI waits in the kernel, and a vCPU waiting for PSCI `CPU_ON` is not dead.
    #[cfg(target_arch = "aarch64")]
    fn is_halted_for_good(&self) -> Result<bool> {
        Ok(false)
    }

    #[cfg(target_arch = "x86_64")]
    fn set_boot_state(&mut self, state: &BootState) -> Result<()> {
        arch::set_boot_state(&self.fd, state)
    }

    #[cfg(target_arch = "x86_64")]
    fn regs(&self) -> Result<Registers> {
        Ok(arch::regs_from_kvm(
            &self.fd.get_regs().map_err(err("KVM_GET_REGS"))?,
        ))
    }

    #[cfg(target_arch = "x86_64")]
    fn set_regs(&mut self, regs: &Registers) -> Result<()> {
        self.fd
            .set_regs(&arch::regs_to_kvm(regs))
            .map_err(err("KVM_SET_REGS"))
    }

    #[cfg(target_arch = "x86_64")]
    fn special_regs(&self) -> Result<SpecialRegisters> {
        Ok(arch::sregs_from_kvm(
            &self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        ))
    }

    #[cfg(target_arch = "x86_64")]
    fn set_special_regs(&mut self, sregs: &SpecialRegisters) -> Result<()> {
        let mut k = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        arch::sregs_to_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(err("KVM_SET_SREGS"))
    }

    #[cfg(target_arch = "x86_64")]
    fn is_halted_for_good(&self) -> Result<bool> {
        let mp = self.fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        if mp.mp_state != kvm_bindings::KVM_MP_STATE_HALTED {
            return Ok(false);
        }
        let regs = self.fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        Ok(regs.rflags & crate::hypervisor::arch::x86_64::bits::RFLAGS_IF == 0)
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if self.thread != Some(me) {
            super::kick::prepare_thread();
            self.kick.set_thread(me);
            self.thread = Some(me);
        }
        let run_area = self.run;
        match self.fd.run() {
            Ok(exit) => Ok(translate(exit, run_area)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run_area` is this vCPU's live kvm_run mapping and no reference
                // into it is held on this path. Re-arm for the next kick.
                unsafe {
                    std::ptr::write_volatile(std::ptr::addr_of_mut!((*run_area).immediate_exit), 0)
                };
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(super::err("KVM_RUN")(e)),
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKick> {
        self.kick.clone()
    }
}

/// Maps a KVM exit to the neutral exit. `run` is the vCPU's kvm_run area, read for the
/// details kvm-ioctls does not decode. The guest PC is left for the caller to fill in.
fn translate<'a>(exit: VcpuExit<'a>, run: *mut kvm_run) -> VmExit<'a> {
    match exit {
        VcpuExit::IoIn(port, data) => VmExit::IoIn {
            port,
            // SAFETY: KVM just reported KVM_EXIT_IO, so the `io` member is the valid one.
            size: unsafe { io_size(run) },
            data,
        },
        VcpuExit::IoOut(port, data) => VmExit::IoOut {
            port,
            // SAFETY: as above.
            size: unsafe { io_size(run) },
            data,
        },
        VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
        VcpuExit::Hlt => VmExit::Halt,
        VcpuExit::Shutdown => VmExit::Shutdown,
        VcpuExit::IoapicEoi(vector) => VmExit::IoapicEoi { vector },
        VcpuExit::Intr => VmExit::Interrupted,
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            other => failure(format!("KVM_EXIT_SYSTEM_EVENT type {other}")),
        },
        // SAFETY: KVM just reported an internal error, so it filled that union member.
        VcpuExit::InternalError => VmExit::Failure(unsafe { internal_error(run) }),
        VcpuExit::FailEntry(reason, cpu) => failure(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
        )),
        other => failure(format!("unexpected KVM exit {other:?}")),
    }
}

/// Access size of the current port I/O exit, never 0.
///
/// # Safety
/// `run` must be a live kvm_run area whose last exit was `KVM_EXIT_IO`.
unsafe fn io_size(run: *const kvm_run) -> usize {
    // SAFETY: per the contract the `io` member of the union is the one KVM filled.
    let size = unsafe { (*run).__bindgen_anon_1.io.size };
    usize::from(size).max(1)
}

fn failure(reason: String) -> VmExit<'static> {
    VmExit::Failure(ExitFailure {
        reason,
        ..Default::default()
    })
}

/// Reads what KVM stored about an internal error or emulation failure.
///
/// # Safety
/// `run` must be a live kvm_run area whose last exit was `KVM_EXIT_INTERNAL_ERROR`.
unsafe fn internal_error(run: *const kvm_run) -> ExitFailure {
    // SAFETY: per the contract the kernel filled the `internal` / `emulation_failure` member
    // of the union; the values are copied out, no reference is kept.
    let (suberror, ndata, data, emu) = unsafe {
        let run = &*run;
        (
            run.__bindgen_anon_1.internal.suberror,
            run.__bindgen_anon_1.internal.ndata,
            run.__bindgen_anon_1.internal.data,
            run.__bindgen_anon_1.emulation_failure,
        )
    };
    let mut failure = ExitFailure {
        reason: "KVM_EXIT_INTERNAL_ERROR".into(),
        suberror: Some(suberror),
        ..Default::default()
    };
    let has_bytes = u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
    if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION && emu.flags & has_bytes != 0 {
        // SAFETY: the flag says the kernel filled insn_size/insn_bytes.
        let insn = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
        let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
        failure.instruction = insn.insn_bytes[..n].to_vec();
    } else {
        let n = (ndata as usize).min(data.len());
        failure.data = data[..n].to_vec();
    }
    failure
}

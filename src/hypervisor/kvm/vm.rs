//! [`Vm`] on KVM.

#[cfg(target_arch = "x86_64")]
use std::sync::Arc;

#[cfg(target_arch = "aarch64")]
use std::sync::Mutex;

#[cfg(target_arch = "x86_64")]
use kvm_bindings::{kvm_enable_cap, kvm_pit_config, CpuId};
use kvm_bindings::{kvm_irq_routing_entry, kvm_msi, kvm_userspace_memory_region, KvmIrqRouting};
#[cfg(target_arch = "x86_64")]
use kvm_ioctls::Cap;
use kvm_ioctls::{NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{err, vcpu::KvmVcpu};
#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64::layout;
use crate::hypervisor::{
    Capabilities, GsiRoute, GsiTarget, HypervisorError, IoEventAddress, IrqchipMode, IrqchipOrder,
    MemoryRegion, Msi, Result, Vcpu, Vm,
};

/// What each vCPU is created with: x86, the CPUID template; arm64, the preferred target.
#[cfg(target_arch = "x86_64")]
pub(super) type ArchVcpuInput = Arc<CpuId>;
/// What each vCPU is created with: x86, the CPUID template; arm64, the preferred target.
#[cfg(target_arch = "aarch64")]
pub(super) type ArchVcpuInput = kvm_bindings::kvm_vcpu_init;

/// What `Kvm::create_vm` hands each VM: x86, the CPUID template; arm64, nothing.
#[cfg(target_arch = "x86_64")]
pub(super) type ArchVmInput = Arc<CpuId>;
/// What `Kvm::create_vm` hands each VM: x86, the CPUID template; arm64, nothing.
#[cfg(target_arch = "aarch64")]
pub(super) type ArchVmInput = ();

/// A KVM virtual machine.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{kvm::Kvm, Hypervisor, IrqchipOrder};
/// let kvm = Kvm::open()?;
/// // A `KvmVm`, used through the backend-neutral `Vm` trait.
/// let vm = kvm.create_vm()?;
/// let x86 = cfg!(target_arch = "x86_64");
/// assert_eq!(vm.irqchip_order() == IrqchipOrder::BeforeVcpus, x86);
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub struct KvmVm {
    fd: VmFd,
    caps: Capabilities,
    /// The VM's CPUID template; each vCPU copies and adjusts it once.
    #[cfg(target_arch = "x86_64")]
    cpuid: Arc<CpuId>,
    /// The host's preferred vCPU target, the same for every vCPU.
    #[cfg(target_arch = "aarch64")]
    vcpu_target: kvm_bindings::kvm_vcpu_init,
    /// The in-kernel GICv3, once created.
    #[cfg(target_arch = "aarch64")]
    gic: Mutex<Option<kvm_ioctls::DeviceFd>>,
    /// irqfds asked for before the GIC exists: arm64 KVM refuses `KVM_IRQFD` with `EAGAIN`
    /// until the vGIC is initialised (`kvm_arch_intc_initialized`), which can only happen
    /// after the vCPUs exist, while devices wire their interrupts before that. They are
    /// registered right after `CTRL_INIT`. Each holds a duplicate of the caller's eventfd.
    #[cfg(target_arch = "aarch64")]
    pending_irqfds: Mutex<Vec<(EventFd, u32)>>,
}

impl KvmVm {
    #[cfg(target_arch = "aarch64")]
    pub(super) fn new(kvm: &kvm_ioctls::Kvm, caps: &Capabilities, _: ArchVmInput) -> Result<Self> {
        // kvm-ioctls asks for the host's largest IPA size (KVM_CAP_ARM_VM_IPA_SIZE) here.
        let fd = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        let vcpu_target = super::aarch64::preferred_target(&fd)?;
        Ok(KvmVm {
            fd,
            caps: caps.clone(),
            vcpu_target,
            gic: Mutex::new(None),
            pending_irqfds: Mutex::new(Vec::new()),
        })
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn new(
        kvm: &kvm_ioctls::Kvm,
        caps: &Capabilities,
        cpuid: ArchVmInput,
    ) -> Result<Self> {
        let fd = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        // Both live in the MMIO gap, where no RAM is mapped; they must be set before vCPUs
        // run (TSS for real-mode emulation on Intel).
        fd.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(err("KVM_SET_TSS_ADDR"))?;
        if fd.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
                .map_err(err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        if caps.emulation_failure_details {
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            if let Err(e) = fd.enable_cap(&cap) {
                log::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not enabled: {e}");
            }
        }
        Ok(KvmVm {
            fd,
            caps: caps.clone(),
            cpuid,
        })
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(&self, r: MemoryRegion) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: if r.read_only {
                kvm_bindings::KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.host_addr,
        };
        // SAFETY: the caller guarantees the host range stays valid while mapped (this
        // function's contract).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn unmap_memory(&self, r: MemoryRegion) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: 0,
            guest_phys_addr: r.guest_addr,
            memory_size: 0,
            userspace_addr: r.host_addr,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(err("KVM_SET_USER_MEMORY_REGION (delete)"))
    }

    #[cfg(target_arch = "x86_64")]
    fn irqchip_order(&self) -> IrqchipOrder {
        IrqchipOrder::BeforeVcpus
    }

    /// The GICv3 redistributors are sized from the vCPUs that exist at `CTRL_INIT`.
    #[cfg(target_arch = "aarch64")]
    fn irqchip_order(&self) -> IrqchipOrder {
        IrqchipOrder::AfterVcpus
    }

    #[cfg(target_arch = "aarch64")]
    fn create_irqchip(&self, _mode: IrqchipMode) -> Result<()> {
        let mut gic = self.gic.lock().unwrap_or_else(|e| e.into_inner());
        if gic.is_some() {
            return Err(HypervisorError::InvalidArgument(
                "the GICv3 already exists".into(),
            ));
        }
        *gic = Some(super::aarch64::create_gic(&self.fd)?);
        let pending = std::mem::take(
            &mut *self
                .pending_irqfds
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (fd, gsi) in &pending {
            self.fd.register_irqfd(fd, *gsi).map_err(err("KVM_IRQFD"))?;
        }
        Ok(())
    }

    #[cfg(target_arch = "aarch64")]
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        super::aarch64::set_spi_line(&self.fd, gsi, level)
    }

    #[cfg(target_arch = "x86_64")]
    fn create_irqchip(&self, mode: IrqchipMode) -> Result<()> {
        match mode {
            IrqchipMode::InKernel => {
                self.fd
                    .create_irq_chip()
                    .map_err(err("KVM_CREATE_IRQCHIP"))?;
                // The PIT drives Linux's early timer calibration; the dummy speaker port keeps
                // port 0x61 inside the kernel.
                let pit = kvm_pit_config {
                    flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                self.fd.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))
            }
            IrqchipMode::Split => {
                if self
                    .fd
                    .check_extension_raw(kvm_bindings::KVM_CAP_SPLIT_IRQCHIP.into())
                    <= 0
                {
                    return Err(HypervisorError::MissingCapability("KVM_CAP_SPLIT_IRQCHIP"));
                }
                // args[0]: how many GSIs (from 0) the userspace IOAPIC owns; KVM watches EOIs
                // of level-triggered MSI routes among them and exits with KVM_EXIT_IOAPIC_EOI.
                let cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                    args: [u64::from(layout::IOAPIC_PINS), 0, 0, 0],
                    ..Default::default()
                };
                self.fd
                    .enable_cap(&cap)
                    .map_err(err("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, level)
            .map_err(err("KVM_IRQ_LINE"))
    }

    fn signal_msi(&self, msi: Msi) -> Result<()> {
        if !self.caps.msi {
            return Err(HypervisorError::Unsupported("KVM_SIGNAL_MSI"));
        }
        let m = kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            flags: if msi.devid.is_some() {
                kvm_bindings::KVM_MSI_VALID_DEVID
            } else {
                0
            },
            devid: msi.devid.unwrap_or(0),
            ..Default::default()
        };
        self.fd.signal_msi(m).map_err(err("KVM_SIGNAL_MSI"))?;
        Ok(())
    }

    fn set_gsi_routing(&self, routes: &[GsiRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(routing_entry).collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| {
            HypervisorError::InvalidArgument(format!(
                "{} GSI routes: more than KVM_MAX_IRQ_ROUTES",
                routes.len()
            ))
        })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(err("KVM_SET_GSI_ROUTING"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        if !self.caps.irqfd {
            return Err(HypervisorError::Unsupported("KVM_IRQFD"));
        }
        #[cfg(target_arch = "aarch64")]
        {
            // Hold the GIC lock so that create_irqchip cannot run between the check and the
            // push.
            let gic = self.gic.lock().unwrap_or_else(|e| e.into_inner());
            if gic.is_none() {
                let dup = fd.try_clone().map_err(|e| {
                    HypervisorError::InvalidArgument(format!("duplicating an irqfd: {e}"))
                })?;
                self.pending_irqfds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((dup, gsi));
                return Ok(());
            }
        }
        self.fd.register_irqfd(fd, gsi).map_err(err("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        #[cfg(target_arch = "aarch64")]
        {
            let gic = self.gic.lock().unwrap_or_else(|e| e.into_inner());
            if gic.is_none() {
                // Not registered with KVM yet: forget the pending one for this line (every
                // eventfd is the same anonymous inode, so the GSI is what identifies it).
                let _ = fd;
                let mut pending = self
                    .pending_irqfds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(i) = pending.iter().position(|(_, g)| *g == gsi) {
                    pending.remove(i);
                }
                return Ok(());
            }
        }
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(err("KVM_IRQFD (deassign)"))
    }

    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        if !self.caps.ioeventfd {
            return Err(HypervisorError::Unsupported("KVM_IOEVENTFD"));
        }
        let addr = kvm_addr(addr);
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(err("KVM_IOEVENTFD"))
    }

    fn unregister_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = kvm_addr(addr);
        match datamatch {
            Some(v) => self.fd.unregister_ioevent(fd, &addr, v),
            None => self.fd.unregister_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(err("KVM_IOEVENTFD (deassign)"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        if id >= self.caps.max_vcpus {
            return Err(HypervisorError::InvalidArgument(format!(
                "vCPU id {id} is not below the host limit of {}",
                self.caps.max_vcpus
            )));
        }
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        #[cfg(target_arch = "x86_64")]
        let arch = self.cpuid.clone();
        #[cfg(target_arch = "aarch64")]
        let arch = self.vcpu_target;
        Ok(Box::new(KvmVcpu::new(fd, id, arch)))
    }
}

fn routing_entry(route: &GsiRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi: route.gsi,
        ..Default::default()
    };
    match route.target {
        GsiTarget::Msi(msi) => {
            e.type_ = kvm_bindings::KVM_IRQ_ROUTING_MSI;
            e.u.msi.address_lo = msi.address as u32;
            e.u.msi.address_hi = (msi.address >> 32) as u32;
            e.u.msi.data = msi.data;
            if let Some(devid) = msi.devid {
                e.flags = kvm_bindings::KVM_MSI_VALID_DEVID;
                e.u.msi.__bindgen_anon_1.devid = devid;
            }
        }
    }
    e
}

fn kvm_addr(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

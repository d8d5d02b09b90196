//! The hypervisor abstraction: one trait per layer (hypervisor → VM → vCPU) and a
//! backend-neutral exit type.
//!
//! Everything above this module (boot code, devices, the VMM) talks to these traits only.
//! Backend types — kvm-ioctls, kvm-bindings, Hypervisor.framework handles — never leave
//! their own sub-module (`kvm/`, later `hvf/`).
//!
//! # How the layers map onto each backend
//!
//! | concept | KVM x86_64 | KVM aarch64 | Hypervisor.framework (arm64) |
//! |---|---|---|---|
//! | [`Hypervisor`] | an open `/dev/kvm` | an open `/dev/kvm` | the process (one VM per process) |
//! | [`Vm`] | `KVM_CREATE_VM` fd | `KVM_CREATE_VM` fd (IPA size from `KVM_CAP_ARM_VM_IPA_SIZE`) | `hv_vm_create` |
//! | [`Vm::create_irqchip`] | [`IrqchipMode::InKernel`]: PIC + IOAPIC + LAPIC + PIT; [`IrqchipMode::Split`]: `KVM_CAP_SPLIT_IRQCHIP` (LAPIC only; the VMM emulates the IOAPIC); **before** vCPUs | GICv3 via `KVM_CREATE_DEVICE`, **after** all vCPUs (mode ignored) | `hv_gic_create`, **before** vCPUs (mode ignored) |
//! | [`Vm::set_irq_line`] | GSI number (ISA IRQ 0-15, IOAPIC pin); in split mode a raise fires the GSI's route | `KVM_IRQ_LINE` with an encoded SPI (INTID − 32) | `hv_gic_set_spi` with the absolute INTID |
//! | [`Vm::set_gsi_routing`] | `KVM_SET_GSI_ROUTING` (MSI routes) | `KVM_SET_GSI_ROUTING` (MSI routes; irqchip routes later) | unsupported |
//! | [`VmExit::IoapicEoi`] | `KVM_EXIT_IOAPIC_EOI`, split mode only | never | never |
//! | [`Vcpu`] | vCPU fd, may move between threads | vCPU fd | `hv_vcpu_create`: bound to the creating thread |
//! | MMIO decoding | KVM decodes, gives address + data | KVM decodes when ESR.ISV=1 | the backend decodes the ESR (data abort syndrome) |
//! | [`VmExit::Halt`] | only without an in-kernel LAPIC | never (WFI handled in kernel) | WFI/WFE trap: the backend waits for the vtimer/IRQ itself |
//! | [`VmExit::PowerOff`]/[`VmExit::Reset`] | `KVM_SYSTEM_EVENT` (rare on x86) | PSCI `SYSTEM_OFF`/`SYSTEM_RESET` as `KVM_SYSTEM_EVENT` | PSCI calls trapped as HVC and decoded by the backend |
//! | [`VcpuKick`] | `immediate_exit` + a signal | `immediate_exit` + a signal | `hv_vcpus_exit` |
//!
//! Because HVF vCPUs are bound to the thread that created them, the VMM always creates each
//! vCPU *on the thread that runs it*; [`Vcpu`] is therefore not required to be `Send`.
//! Because the order of interrupt-controller and vCPU creation differs per backend, the VMM
//! asks [`Vm::irqchip_order`] instead of hard-coding it.

pub mod arch;
mod error;
mod exit;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod kvm;

pub use error::{HypervisorError, Result};
pub use exit::{ExitFailure, VmExit};

use std::sync::Arc;

#[cfg(target_os = "linux")]
pub use vmm_sys_util::eventfd::EventFd;

/// What a hypervisor backend can do on this host, probed once when it is opened.
///
/// # Example
/// ```
/// use smolvm::hypervisor::Capabilities;
/// /// Whether an unmodified Linux kernel with `vcpus` CPUs can boot.
/// fn can_boot_linux(caps: &Capabilities, vcpus: u32) -> bool {
///     !caps.software_virtualization && vcpus <= caps.max_vcpus
/// }
/// let caps = Capabilities { max_vcpus: 255, irqfd: true, ..Default::default() };
/// assert!(can_boot_linux(&caps, 4));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Largest vCPU count one VM may have.
    pub max_vcpus: u32,
    /// Number of guest memory slots one VM may have.
    pub max_memory_slots: u32,
    /// Interrupts can be injected by writing an eventfd (KVM irqfd), with no ioctl on the hot path.
    pub irqfd: bool,
    /// Guest writes to a registered address can signal an eventfd without a userspace exit.
    pub ioeventfd: bool,
    /// Message-signalled interrupts can be injected ([`Vm::signal_msi`]).
    pub msi: bool,
    /// Emulation failures report the failing instruction bytes ([`ExitFailure::instruction`]).
    pub emulation_failure_details: bool,
    /// The backend is a *software* hypervisor (for example Linux `kvm_pvm`) that emulates guest
    /// kernel mode: small purpose-built guests run, an unmodified Linux kernel does not.
    pub software_virtualization: bool,
}

/// An open hypervisor: the first layer. Cheap to share; one per process is enough.
///
/// # Example
/// ```no_run
/// let hv = smolvm::hypervisor::open().expect("no usable hypervisor");
/// println!("{} supports {} vCPUs", hv.name(), hv.capabilities().max_vcpus);
/// let vm = hv.create_vm().expect("create VM");
/// # drop(vm);
/// ```
pub trait Hypervisor: Send + Sync {
    /// Short backend name, for logs (`"kvm"`, `"hvf"`).
    fn name(&self) -> &'static str;

    /// Capabilities probed when the hypervisor was opened.
    fn capabilities(&self) -> &Capabilities;

    /// Creates an empty VM: no memory, no interrupt controller, no vCPUs.
    ///
    /// KVM x86_64 also sets the TSS and identity-map addresses here because they must be set
    /// before any vCPU runs and never change.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
}

/// When the in-kernel interrupt controller must be created relative to the vCPUs.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{IrqchipMode, IrqchipOrder};
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// let first = vm.irqchip_order() == IrqchipOrder::BeforeVcpus;
/// if first {
///     vm.create_irqchip(IrqchipMode::default())?;
/// }
/// let vcpu = vm.create_vcpu(0)?;
/// if !first {
///     vm.create_irqchip(IrqchipMode::default())?;
/// }
/// # drop(vcpu);
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqchipOrder {
    /// x86 KVM (the LAPIC is created with each vCPU and needs the irqchip) and HVF.
    BeforeVcpus,
    /// arm64 KVM: the GICv3 redistributors are sized from the vCPUs that already exist.
    AfterVcpus,
}

/// Which parts of the x86 interrupt controller the hypervisor emulates.
///
/// Backends without that choice ignore it: on arm64 (KVM and Hypervisor.framework) the GIC
/// is always emulated by the hypervisor, and both modes mean the same thing there.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::IrqchipMode;
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(IrqchipMode::Split)?;
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IrqchipMode {
    /// The default: the 8259 PIC pair, the IOAPIC, the LAPICs and the 8254 PIT all live in the
    /// kernel (KVM `KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2`), as under Firecracker. Every guest
    /// that expects a PC works, including ones that calibrate against the PIT. Destroying such
    /// a VM is slow on KVM (each in-kernel I/O-bus device costs an SRCU grace period: 15-25 ms
    /// measured).
    #[default]
    InKernel,
    /// Only the LAPICs live in the kernel (KVM `KVM_CAP_SPLIT_IRQCHIP`); the VMM emulates the
    /// IOAPIC ([`crate::devices::legacy::Ioapic`]) and routes its pins as MSIs through
    /// [`Vm::set_gsi_routing`]. There is no PIC and no PIT. Linux boots like this under
    /// cloud-hypervisor (kvm-clock and the TSC-deadline LAPIC timer). VM teardown is about
    /// 100 times faster and start-up skips the PIT.
    Split,
}

/// Where a GSI's interrupt goes: the target of one [`GsiRoute`].
///
/// Non-exhaustive so arm64 irqchip routes (GIC SPIs) can be added.
///
/// # Example
/// ```
/// use smolvm::hypervisor::{GsiRoute, GsiTarget, Msi};
/// let route = GsiRoute::msi(5, Msi { address: 0xfee0_0000, data: 0x35, devid: None });
/// match route.target {
///     GsiTarget::Msi(msi) => assert_eq!(msi.data & 0xff, 0x35, "vector"),
///     _ => unreachable!("only MSI targets exist on x86"),
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GsiTarget {
    /// Raising the GSI sends this message-signalled interrupt.
    Msi(Msi),
}

/// One entry of a VM's GSI routing table ([`Vm::set_gsi_routing`]): plain data.
///
/// # Example
/// ```
/// use smolvm::hypervisor::{GsiRoute, GsiTarget, Msi};
/// let r = GsiRoute::msi(10, Msi { address: 0xfee0_0000, data: 0x40, devid: None });
/// assert_eq!(r.gsi, 10);
/// assert!(matches!(r.target, GsiTarget::Msi(m) if m.data == 0x40));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsiRoute {
    /// The global system interrupt number (x86: the IOAPIC pin for pins 0-23).
    pub gsi: u32,
    /// What raising it does.
    pub target: GsiTarget,
}

impl GsiRoute {
    /// A route that turns GSI `gsi` into `msi`.
    pub fn msi(gsi: u32, msi: Msi) -> Self {
        GsiRoute {
            gsi,
            target: GsiTarget::Msi(msi),
        }
    }
}

/// One range of host memory that backs a range of guest physical memory.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::MemoryRegion;
/// use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)])?;
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// for (slot, r) in mem.iter().enumerate() {
///     let region = MemoryRegion {
///         slot: slot as u32,
///         guest_addr: r.start_addr().0,
///         size: r.len(),
///         host_addr: r.get_host_address(MemoryRegionAddress(0))? as u64,
///         read_only: false,
///     };
///     // SAFETY: `vm` is declared after `mem`, so it is dropped first.
///     unsafe { vm.map_memory(region)? };
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Backend slot number; unique per VM, below [`Capabilities::max_memory_slots`].
    pub slot: u32,
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes; a multiple of the host page size.
    pub size: u64,
    /// Host virtual address of the first byte; page aligned.
    pub host_addr: u64,
    /// Guest writes fault (MMIO exit on KVM) instead of changing memory.
    pub read_only: bool,
}

/// A message-signalled interrupt, in the backend-neutral form the device sends it.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::Msi;
/// // Fixed delivery of vector 0x31 to the CPU with APIC id 1.
/// let msi = Msi { address: 0xfee0_0000 | 1 << 12, data: 0x31, devid: None };
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// vm.signal_msi(msi)?;
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Msi {
    /// Message address (x86: 0xFEEx_xxxx with the destination APIC id; arm64: the ITS doorbell).
    pub address: u64,
    /// Message data (x86: vector and delivery mode; arm64: the event id).
    pub data: u32,
    /// Requester id, for backends that route MSIs through an ITS.
    pub devid: Option<u32>,
}

/// Where an ioeventfd listens.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{EventFd, IoEventAddress};
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// let doorbell = EventFd::new(libc::EFD_NONBLOCK)?;
/// let addr = IoEventAddress::Mmio(0xd000_0050);
/// // Guest writes of 0 to the address now only signal `doorbell`: no exit to the VMM.
/// vm.register_ioeventfd(&doorbell, addr, Some(0))?;
/// vm.unregister_ioeventfd(&doorbell, addr, Some(0))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// An x86 I/O port.
    Pio(u16),
    /// A guest physical MMIO address.
    Mmio(u64),
}

/// A VM: guest memory, the interrupt controller and the vCPUs of one guest.
///
/// The optional capabilities (MSIs, GSI routing, irqfd, ioeventfd) have default bodies that
/// return [`HypervisorError::Unsupported`], so a backend (or a test double) implements only
/// what it has; callers fall back to the plain paths on `Unsupported`.
///
/// Shared between the VMM, its vCPU threads and its devices (they raise interrupts through
/// it), so every method takes `&self`.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{EventFd, IrqchipMode};
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// // Guest RAM goes in with `map_memory` (see `MemoryRegion`).
/// vm.create_irqchip(IrqchipMode::InKernel)?; // x86 KVM: before the vCPUs
/// let vcpu = vm.create_vcpu(0)?;
/// vm.set_irq_line(4, true)?; // an edge on ISA IRQ 4 (COM1)…
/// vm.set_irq_line(4, false)?;
/// let irq = EventFd::new(libc::EFD_NONBLOCK)?;
/// vm.register_irqfd(&irq, 4)?;
/// irq.write(1)?; // …and the same edge without an ioctl
/// # drop(vcpu);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Vm: Send + Sync {
    /// Maps `region` into the guest physical address space.
    ///
    /// # Safety
    /// `region.host_addr .. + size` must be a valid, writable host mapping that stays mapped
    /// until [`Vm::unmap_memory`] removes the slot or the VM is dropped: the guest (and the
    /// hypervisor on its behalf) reads and writes it at any time.
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()>;

    /// Removes a slot added by [`Vm::map_memory`]. Guest accesses to the range become MMIO
    /// exits.
    fn unmap_memory(&self, region: MemoryRegion) -> Result<()>;

    /// Whether [`Vm::create_irqchip`] must run before or after the vCPUs are created.
    fn irqchip_order(&self) -> IrqchipOrder;

    /// Creates the in-kernel interrupt controller.
    ///
    /// x86 KVM, [`IrqchipMode::InKernel`]: PIC + IOAPIC + LAPIC + PIT with the default routing
    /// (GSIs 0-15 are the ISA IRQs on the PIC and IOAPIC, 16-23 the remaining IOAPIC pins).
    /// [`IrqchipMode::Split`]: only the LAPICs, with
    /// [`IOAPIC_PINS`](crate::arch::x86_64::layout::IOAPIC_PINS) GSIs reserved for a userspace
    /// IOAPIC; the routing table starts empty (fill it with [`Vm::set_gsi_routing`]) and
    /// guest EOIs of level-triggered routed vectors come back as [`VmExit::IoapicEoi`].
    /// arm64 KVM and HVF ignore `mode`: the GIC is always in the kernel.
    fn create_irqchip(&self, mode: IrqchipMode) -> Result<()>;

    /// Drives interrupt line `gsi` high or low. An edge-triggered interrupt is a raise then a
    /// lower. On arm64 `gsi` is the SPI number counted from 0 (INTID − 32); the backend adds
    /// the offset its API needs.
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()>;

    /// Injects a message-signalled interrupt. The default (for backends without MSIs)
    /// returns [`HypervisorError::Unsupported`].
    fn signal_msi(&self, msi: Msi) -> Result<()> {
        let _ = msi;
        Err(HypervisorError::Unsupported("MSI injection"))
    }

    /// Replaces the VM's whole GSI routing table with `routes` (GSIs not listed go nowhere).
    /// Irqfds registered on a GSI follow the change. Returns
    /// [`HypervisorError::Unsupported`] where the backend has no routing table (HVF).
    ///
    /// On x86 KVM this is how a userspace IOAPIC ([`IrqchipMode::Split`]) connects its pins:
    /// it owns GSIs 0-23 and pushes its table whenever the guest reprograms a pin.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::hypervisor::{GsiRoute, IrqchipMode, Msi};
    /// let vm = smolvm::hypervisor::open()?.create_vm()?;
    /// vm.create_irqchip(IrqchipMode::Split)?;
    /// // GSI 10 now sends vector 0x4a to APIC id 0; raising it (irqfd or line) fires the MSI.
    /// let msi = Msi { address: 0xfee0_0000, data: 0x4a, devid: None };
    /// vm.set_gsi_routing(&[GsiRoute::msi(10, msi)])?;
    /// vm.set_irq_line(10, true)?;
    /// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
    /// ```
    fn set_gsi_routing(&self, routes: &[GsiRoute]) -> Result<()> {
        let _ = routes;
        Err(HypervisorError::Unsupported("GSI routing"))
    }

    /// Makes every write to `fd` pulse interrupt line `gsi`, without an ioctl per interrupt.
    /// Returns [`HypervisorError::Unsupported`] where the backend has no irqfd (HVF).
    #[cfg(target_os = "linux")]
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        let _ = (fd, gsi);
        Err(HypervisorError::Unsupported("irqfd"))
    }

    /// Undoes [`Vm::register_irqfd`].
    #[cfg(target_os = "linux")]
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        let _ = (fd, gsi);
        Err(HypervisorError::Unsupported("irqfd"))
    }

    /// Makes guest writes to `addr` signal `fd` instead of exiting to the VMM. With
    /// `datamatch`, only writes of that value do; the access width is taken from the value's
    /// intended register width (4 bytes). Returns [`HypervisorError::Unsupported`] where the
    /// backend has no ioeventfd.
    #[cfg(target_os = "linux")]
    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let _ = (fd, addr, datamatch);
        Err(HypervisorError::Unsupported("ioeventfd"))
    }

    /// Undoes [`Vm::register_ioeventfd`].
    #[cfg(target_os = "linux")]
    fn unregister_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let _ = (fd, addr, datamatch);
        Err(HypervisorError::Unsupported("ioeventfd"))
    }

    /// Creates vCPU `id` (0-based; on x86 also its APIC id). Call it on the thread that will
    /// run the vCPU: HVF binds vCPUs to their creating thread.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
}

/// How a vCPU's platform identity is set up before it first runs.
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::CpuConfig;
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// // Second vCPU of two: CPUID reports two CPUs and APIC id 1.
/// let mut vcpu = vm.create_vcpu(1)?;
/// vcpu.configure(&CpuConfig { id: 1, count: 2 })?;
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuConfig {
    /// This vCPU's index, 0-based.
    pub id: u32,
    /// Number of vCPUs in the VM (x86: CPUID topology leaves; arm64: nothing).
    pub count: u32,
}

/// Interrupts a running vCPU from another thread.
///
/// After [`VcpuKick::kick`], the vCPU's current or next [`Vcpu::run`] returns
/// [`VmExit::Interrupted`] promptly, even if the guest is halted. Kicks do not queue: several
/// kicks before the vCPU notices are one interruption.
///
/// # Example
/// ```no_run
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// let vcpu = vm.create_vcpu(0)?;
/// let kicker = vcpu.kicker(); // an `Arc<dyn VcpuKick>`, safe to send
/// let stopper = std::thread::spawn(move || kicker.kick());
/// // Meanwhile this thread's `vcpu.run()` returns `VmExit::Interrupted`.
/// stopper.join().unwrap();
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub trait VcpuKick: Send + Sync {
    /// Requests the interruption; never blocks.
    fn kick(&self);
}

/// One virtual CPU.
///
/// Not `Send`: HVF vCPUs must stay on the thread that created them (KVM's may move, but the
/// VMM does not rely on it).
///
/// # Example
/// ```no_run
/// use smolvm::hypervisor::{CpuConfig, VmExit};
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// // (Map guest memory and load a guest first, see `MemoryRegion` and `configure_system`.)
/// let mut vcpu = vm.create_vcpu(0)?;
/// vcpu.configure(&CpuConfig { id: vcpu.id(), count: 1 })?;
/// let mut regs = vcpu.regs()?;
/// regs.rip = 0x1000;
/// vcpu.set_regs(&regs)?;
/// loop {
///     match vcpu.run()? {
///         VmExit::IoOut { port: 0x3f8, data, .. } => print!("{}", String::from_utf8_lossy(data)),
///         VmExit::Interrupted => {}
///         other => break println!("vCPU stopped: {other:?}"),
///     }
/// }
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub trait Vcpu {
    /// The id given to [`Vm::create_vcpu`].
    fn id(&self) -> u32;

    /// Sets the CPU's platform identity. x86 KVM: CPUID (from `KVM_GET_SUPPORTED_CPUID`,
    /// with topology, APIC id and hypervisor leaves adjusted), boot MSRs, FPU defaults and LAPIC
    /// LINT0 = ExtINT / LINT1 = NMI. arm64 KVM: `KVM_ARM_VCPU_INIT` with PSCI 0.2 (secondaries
    /// powered off). HVF: MPIDR.
    fn configure(&mut self, config: &CpuConfig) -> Result<()>;

    /// Registers this vCPU starts from (x86: general purpose, segment and control registers).
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::arch::x86_64::configure_system;
    /// use smolvm::boot::{load_kernel, KernelCmdline};
    /// use smolvm::hypervisor::CpuConfig;
    /// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 128 << 20)])?;
    /// let kernel = load_kernel(&mem, "vmlinux".as_ref())?;
    /// let boot = configure_system(&mem, &kernel, &KernelCmdline::new(), None, 1)?;
    /// let vm = smolvm::hypervisor::open()?.create_vm()?;
    /// // … map `mem` (see `MemoryRegion`), create the irqchip …
    /// let mut vcpu = vm.create_vcpu(0)?;
    /// vcpu.configure(&CpuConfig { id: 0, count: 1 })?;
    /// vcpu.set_boot_state(&boot)?; // the next `run` enters the kernel
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(target_arch = "x86_64")]
    fn set_boot_state(&mut self, state: &arch::x86_64::BootState) -> Result<()>;

    /// aarch64: the boot CPU's entry registers (`PC`, `x0` = the device tree; `x1`-`x3` = 0;
    /// `PSTATE` = EL1h with `DAIF` masked). Only the boot CPU gets one: the others start
    /// powered off ([`Vcpu::configure`]) until the guest's PSCI `CPU_ON`.
    ///
    /// # Example
    /// ```no_run
    /// # #[cfg(target_arch = "aarch64")] {
    /// use smolvm::hypervisor::{arch::aarch64::BootState, CpuConfig};
    /// let vm = smolvm::hypervisor::open()?.create_vm()?;
    /// let mut vcpu = vm.create_vcpu(0)?;
    /// vcpu.configure(&CpuConfig { id: 0, count: 1 })?;
    /// vm.create_irqchip(Default::default())?; // arm64: after the vCPUs
    /// vcpu.set_boot_state(&BootState { pc: 0x8000_0000, x0: 0x8fe0_0000 })?;
    /// # }
    /// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
    /// ```
    #[cfg(target_arch = "aarch64")]
    fn set_boot_state(&mut self, state: &arch::aarch64::BootState) -> Result<()>;

    /// Reads the general purpose registers.
    #[cfg(target_arch = "x86_64")]
    fn regs(&self) -> Result<arch::x86_64::Registers>;

    /// Writes the general purpose registers.
    #[cfg(target_arch = "x86_64")]
    fn set_regs(&mut self, regs: &arch::x86_64::Registers) -> Result<()>;

    /// Reads the segment, descriptor-table and control registers.
    #[cfg(target_arch = "x86_64")]
    fn special_regs(&self) -> Result<arch::x86_64::SpecialRegisters>;

    /// Writes the segment, descriptor-table and control registers.
    #[cfg(target_arch = "x86_64")]
    fn set_special_regs(&mut self, sregs: &arch::x86_64::SpecialRegisters) -> Result<()>;

    /// Whether the vCPU is halted waiting for an interrupt that cannot come: halted with
    /// interrupts disabled (x86 `cli; hlt`). Only meaningful between two [`Vcpu::run`] calls.
    ///
    /// # Example
    /// ```
    /// use smolvm::hypervisor::{Result, Vcpu, VmExit};
    /// /// Runs until the guest parks itself for good (`cli; hlt`).
    /// fn run_until_dead(vcpu: &mut dyn Vcpu) -> Result<()> {
    ///     loop {
    ///         let stopped = matches!(vcpu.run()?, VmExit::Halt | VmExit::Interrupted);
    ///         if stopped && vcpu.is_halted_for_good()? {
    ///             return Ok(());
    ///         }
    ///     }
    /// }
    /// ```
    fn is_halted_for_good(&self) -> Result<bool>;

    /// Runs guest code until something needs the VMM. For [`VmExit::IoIn`] and
    /// [`VmExit::MmioRead`], fill the buffer before the next call: the backend completes the
    /// guest's load then.
    fn run(&mut self) -> Result<VmExit<'_>>;

    /// A handle other threads use to interrupt [`Vcpu::run`].
    fn kicker(&self) -> Arc<dyn VcpuKick>;
}

/// Opens the default hypervisor for this host: KVM on Linux.
///
/// # Errors
/// [`HypervisorError::NotFound`] or [`HypervisorError::PermissionDenied`] with a message that
/// says how to fix it; [`HypervisorError::Unsupported`] where no backend exists yet.
///
/// # Example
/// ```no_run
/// let hv = smolvm::hypervisor::open()?;
/// if hv.capabilities().software_virtualization {
///     eprintln!("software KVM: only small guests will run");
/// }
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub fn open() -> Result<Arc<dyn Hypervisor>> {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        Ok(Arc::new(kvm::Kvm::open()?))
    }
    #[cfg(not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    {
        Err(HypervisorError::Unsupported(
            "no hypervisor backend for this host yet (Hypervisor.framework is planned)",
        ))
    }
}

//! Turning a [`VmBuilder`] into a running VM: memory → kernel → platform tables → interrupt
//! controller → devices → vCPU threads.

use std::sync::{Arc, Mutex, OnceLock};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

#[cfg(target_arch = "aarch64")]
use super::boot_aarch64::SERIAL_IRQ;
use super::config::VmBuilder;
use super::control::Control;
use super::device_loop::DeviceLoop;
#[cfg(target_os = "linux")]
use super::handle::VsockInfo;
use super::handle::{BlockDeviceInfo, NetDeviceInfo, Resources, VmHandle};
use super::net_config::NetBackendSpec;
use super::vcpu_thread::{self, Startup, VcpuContext};
use super::ExitReason;
use crate::arch::x86_64::layout;
use crate::devices::legacy::{self, Ioapic, PmControl, Serial, I8042};
use crate::devices::virtio::block::{Block, BlockStats, Disk};
#[cfg(not(target_arch = "aarch64"))]
use crate::devices::virtio::mmio::{MmioAllocError, MmioAllocator};
use crate::devices::virtio::mmio::{MmioSlot, MmioTransport};
#[cfg(target_os = "linux")]
use crate::devices::virtio::net::Tap;
use crate::devices::virtio::net::{Net, NetBackend};
use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice};
use crate::devices::{Bus, InterruptLine, PlatformEvent, PlatformEventSink};
#[cfg(target_arch = "aarch64")]
use crate::hypervisor::arch::aarch64::BootState;
#[cfg(target_arch = "x86_64")]
use crate::hypervisor::arch::x86_64::BootState;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use crate::hypervisor::HypervisorError;
use crate::hypervisor::{self, Hypervisor, IrqchipMode, IrqchipOrder, MemoryRegion, Vm};
use crate::memory::{self, GuestMemory};
use crate::{Error, Result};

/// Most vCPUs the platform tables describe (MP table APIC ids are 8-bit, one id is the
/// IOAPIC's): [`mptable::MAX_VCPUS`](crate::arch::x86_64::mptable::MAX_VCPUS).
pub const MAX_VCPUS: u32 = crate::arch::x86_64::mptable::MAX_VCPUS;

/// The process-wide hypervisor, opened on first use: `/dev/kvm` is opened and probed once,
/// and `KVM_GET_SUPPORTED_CPUID` is asked once, however many VMs the process starts.
fn shared_hypervisor() -> Result<Arc<dyn Hypervisor>> {
    static SHARED: OnceLock<Arc<dyn Hypervisor>> = OnceLock::new();
    if let Some(hv) = SHARED.get() {
        return Ok(hv.clone());
    }
    let hv = hypervisor::open()?;
    Ok(SHARED.get_or_init(|| hv).clone())
}

impl VmBuilder {
    /// Builds the VM and starts its vCPUs.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing kernel, impossible sizes or more
    /// [`block_device`](Self::block_device)s than virtio-mmio slots, [`Error::Hypervisor`] when
    /// `/dev/kvm` is missing or inaccessible (the message says how to fix it),
    /// [`Error::Boot`] for an unreadable or unrecognised kernel/initrd or too little memory,
    /// [`Error::Bus`] for overlapping device ranges, [`Error::SoftwareVirtualization`] when
    /// [`require_hardware_virtualization`](Self::require_hardware_virtualization) is set on a
    /// software-only host.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// println!("{}", vm.wait());
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn start(self) -> Result<VmHandle> {
        start(self)
    }
}

fn validate(cfg: &VmBuilder, hv: &dyn Hypervisor) -> Result<()> {
    if cfg.kernel.is_none() {
        return Err(Error::Config(
            "no kernel: call .kernel(path) with a vmlinux or bzImage".into(),
        ));
    }
    let max = MAX_VCPUS.min(hv.capabilities().max_vcpus.max(1));
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(Error::Config(format!(
            "{} vCPUs requested: use 1 to {max}",
            cfg.vcpus
        )));
    }
    if cfg.memory_mib < 2 {
        return Err(Error::Config(format!(
            "{} MiB of memory: use at least 2 (kernels need tens)",
            cfg.memory_mib
        )));
    }
    if cfg.memory_mib > (1 << 20) {
        return Err(Error::Config(format!(
            "{} MiB of memory: more than 1 TiB is not supported",
            cfg.memory_mib
        )));
    }
    if hv.capabilities().software_virtualization && cfg.require_hardware_virtualization {
        return Err(Error::SoftwareVirtualization);
    }
    Ok(())
}

fn start(mut cfg: VmBuilder) -> Result<VmHandle> {
    // Virtio-mmio devices are announced on the kernel command line, so their slots are
    // decided before the command line is written into guest memory.
    #[cfg(target_os = "linux")]
    let vsock_count = usize::from(cfg.vsock.is_some());
    #[cfg(not(target_os = "linux"))]
    let vsock_count = 0;
    let slots =
        allocate_virtio_slots(cfg.block_devices.len() + cfg.net_devices.len() + vsock_count)?;
    for slot in &slots {
        cfg.cmdline.push_param(&slot.kernel_cmdline_arg());
    }
    let hv = match cfg.hypervisor.take() {
        Some(hv) => hv,
        None => shared_hypervisor()?,
    };
    validate(&cfg, hv.as_ref())?;

    let memory = create_memory(cfg.memory_mib << 20)?;
    let vm = hv.create_vm()?;
    map_memory(vm.as_ref(), &memory)?;

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    let boot_state = load_guest(&cfg, &memory)?;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    load_guest(&cfg, &memory)?;

    if vm.irqchip_order() == IrqchipOrder::BeforeVcpus {
        vm.create_irqchip(cfg.irqchip)?;
    }

    let control = Arc::new(Control::new(cfg.vcpus));
    let mut devices = Devices::build(&mut cfg, &vm, &memory, &slots, platform_events(&control))?;
    let device_loop = devices.start_loop()?;
    let threads = match start_vcpus(
        &cfg,
        &vm,
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        boot_state,
        &devices,
        &control,
    ) {
        Ok(t) => t,
        Err(e) => {
            if let Some(l) = device_loop {
                l.stop();
            }
            return Err(e);
        }
    };

    Ok(VmHandle {
        control,
        threads: Mutex::new(threads),
        device_loop: Mutex::new(device_loop),
        resources: Mutex::new(Some(Resources {
            vm,
            memory,
            serial: devices.serial,
            ioapic: devices.ioapic,
            block_devices: devices.block_devices,
            net_devices: devices.net_devices,
            #[cfg(target_os = "linux")]
            vsock: devices.vsock,
        })),
        // arm64 vCPUs never report "halted for good" (WFI waits in KVM, and a vCPU waiting for
        // PSCI CPU_ON is not dead), so the probe could never end a VM there; and its periodic
        // kicks of every vCPU were seen to livelock a 2-vCPU Linux guest on its way to
        // PSCI SYSTEM_RESET/SYSTEM_OFF (nested KVM under QEMU TCG; guest/e2e). Off on arm64.
        halt_probe: if cfg!(target_arch = "aarch64") {
            None
        } else {
            cfg.halt_probe
        },
    })
}

/// One slot per virtio device, in order, from the x86 microVM layout.
fn allocate_virtio_slots(count: usize) -> Result<Vec<MmioSlot>> {
    #[cfg(target_arch = "aarch64")]
    let mut slots = super::boot_aarch64::virtio_allocator();
    #[cfg(not(target_arch = "aarch64"))]
    let mut slots = MmioAllocator::x86_64();
    for _ in 0..count {
        if let Err(e) = slots.allocate() {
            let fit = slots.slots().len();
            #[cfg(target_arch = "aarch64")]
            let why = super::boot_aarch64::virtio_exhausted(e);
            #[cfg(not(target_arch = "aarch64"))]
            let why = match e {
                MmioAllocError::IrqsExhausted => format!(
                    "one interrupt line each, GSIs {}-{}",
                    layout::IRQ_DEVICES_START,
                    layout::IRQ_DEVICES_END
                ),
                MmioAllocError::AddressesExhausted => format!(
                    "one 4 KiB window each in {:#x}..{:#x}",
                    layout::MMIO_DEVICES_START,
                    layout::IOAPIC_START
                ),
            };
            return Err(Error::Config(format!(
                "{count} virtio devices requested, but at most {fit} fit ({why}): {e}"
            )));
        }
    }
    Ok(slots.slots().to_vec())
}

/// A virtio-blk device that publishes its counters where the [`VmHandle`] can read them
/// without taking the transport lock.
struct PublishedBlock {
    inner: Block<Box<dyn Disk>>,
    stats: Arc<Mutex<BlockStats>>,
}

impl PublishedBlock {
    fn publish(&self) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.inner.stats();
    }
}

impl VirtioDevice for PublishedBlock {
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }
    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), ActivateError> {
        self.inner.activate(ctx)
    }
    fn queue_notify(&mut self, queue: u16) -> bool {
        let more = self.inner.queue_notify(queue);
        self.publish();
        more
    }
    fn reset(&mut self) {
        self.inner.reset();
        self.publish();
    }
}

/// Turns device requests (i8042 reset, power-off register) into the VM's exit reason. Holds
/// the control state weakly so devices never keep a finished VM alive.
fn platform_events(control: &Arc<Control>) -> PlatformEventSink {
    let control = Arc::downgrade(control);
    Arc::new(move |event| {
        if let Some(c) = control.upgrade() {
            c.request_exit(match event {
                PlatformEvent::Reset => ExitReason::Reset,
                PlatformEvent::PowerOff => ExitReason::PowerOff,
            });
        }
    })
}

/// The VM's devices, wired onto their buses.
struct Devices {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    /// The userspace IOAPIC in split-irqchip mode.
    ioapic: Option<Arc<Mutex<Ioapic>>>,
    block_devices: Vec<BlockDeviceInfo>,
    net_devices: Vec<NetDeviceInfo>,
    #[cfg(target_os = "linux")]
    vsock: Option<VsockInfo>,
    /// Queue ioeventfds of the virtio devices, for the device event loop.
    #[cfg(target_os = "linux")]
    queue_events: Vec<super::device_loop::QueueEvents>,
}

/// Places virtio devices on their slots: transport, MMIO window, queue ioeventfds and host
/// event sources, in the order the slots were allocated (the order the kernel command line
/// announces them).
struct VirtioWiring<'a> {
    vm: &'a Arc<dyn Vm>,
    memory: &'a GuestMemory,
    mmio: &'a mut Bus,
    slots: std::slice::Iter<'a, MmioSlot>,
    #[cfg(target_os = "linux")]
    queue_events: Vec<super::device_loop::QueueEvents>,
}

impl VirtioWiring<'_> {
    fn attach(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(MmioSlot, Arc<Mutex<MmioTransport>>)> {
        let slot = *self
            .slots
            .next()
            .ok_or_else(|| Error::Config("more virtio devices than allocated slots".into()))?;
        let queues = device.queue_max_sizes().len();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            self.memory.clone(),
            InterruptLine::new(self.vm, slot.irq)?,
        )));
        check_not_ram(self.memory, slot.addr, slot.len)?;
        self.mmio.insert(slot.addr, slot.len, transport.clone())?;
        #[cfg(target_os = "linux")]
        if let Some(e) =
            super::device_loop::QueueEvents::register(self.vm, slot, queues, transport.clone())?
        {
            self.queue_events.push(e);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = queues;
        Ok((slot, transport))
    }
}

impl Devices {
    /// The legacy devices at their fixed ports, the IOAPIC in split mode, and the caller's
    /// devices (taken out of `cfg`).
    fn build(
        cfg: &mut VmBuilder,
        vm: &Arc<dyn Vm>,
        memory: &GuestMemory,
        slots: &[MmioSlot],
        events: PlatformEventSink,
    ) -> Result<Self> {
        let console = std::mem::replace(&mut cfg.console, legacy::ConsoleSink::Discard);
        let serial = Arc::new(Mutex::new(Serial::new(
            InterruptLine::new(vm, SERIAL_IRQ)?,
            console,
        )));
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
        let mut pio = Bus::new("pio");
        #[cfg(not(target_arch = "aarch64"))]
        pio.insert(u64::from(legacy::COM1_PORT), 8, serial.clone())?;
        pio.insert(u64::from(legacy::I8042_DATA_PORT), 1, i8042.clone())?;
        pio.insert(u64::from(legacy::I8042_COMMAND_PORT), 1, i8042)?;
        pio.insert(
            u64::from(legacy::PM1A_CONTROL_PORT),
            2,
            Arc::new(Mutex::new(PmControl::new(events))),
        )?;
        for d in cfg.pio_devices.drain(..) {
            pio.insert(d.base, d.len, d.device)?;
        }

        let mut mmio = Bus::new("mmio");
        #[cfg(target_arch = "aarch64")]
        super::boot_aarch64::insert_serial(&mut mmio, serial.clone())?;
        // Split irqchip: the IOAPIC is ours (x86; other architectures' GIC stays in the
        // kernel).
        let ioapic = (cfg!(target_arch = "x86_64") && cfg.irqchip == IrqchipMode::Split)
            .then(|| Arc::new(Mutex::new(Ioapic::new(vm.clone()))));
        if let Some(ioapic) = &ioapic {
            mmio.insert(
                layout::IOAPIC_START,
                legacy::ioapic::IOAPIC_MMIO_SIZE,
                ioapic.clone(),
            )?;
        }
        for d in cfg.mmio_devices.drain(..) {
            check_not_ram(memory, d.base, d.len)?;
            mmio.insert(d.base, d.len, d.device)?;
        }
        let mut virtio = VirtioWiring {
            vm,
            memory,
            mmio: &mut mmio,
            slots: slots.iter(),
            #[cfg(target_os = "linux")]
            queue_events: Vec::new(),
        };
        let mut block_devices = Vec::with_capacity(cfg.block_devices.len());
        for disk in cfg.block_devices.drain(..) {
            let stats = Arc::new(Mutex::new(BlockStats::default()));
            let device = PublishedBlock {
                inner: Block::new(disk),
                stats: stats.clone(),
            };
            let (slot, transport) = virtio.attach(Box::new(device))?;
            block_devices.push(BlockDeviceInfo {
                slot,
                stats,
                _transport: transport,
            });
        }
        let mut net_devices = Vec::with_capacity(cfg.net_devices.len());
        for dev in cfg.net_devices.drain(..) {
            let (backend, interface): (Box<dyn NetBackend>, Option<String>) = match dev.backend {
                #[cfg(target_os = "linux")]
                NetBackendSpec::Tap(tap) => {
                    let name = tap.name().to_string();
                    (Box::new(tap), Some(name))
                }
                #[cfg(target_os = "linux")]
                NetBackendSpec::OpenTap(name) => {
                    let tap = Tap::open(&name)?;
                    (Box::new(tap), Some(name))
                }
                #[cfg(target_os = "linux")]
                NetBackendSpec::CreateTap(config) => {
                    let tap = Tap::create(&config)?;
                    let name = tap.name().to_string();
                    (Box::new(tap), Some(name))
                }
                NetBackendSpec::Custom(b) => (b, None),
            };
            let net = Net::new(backend, dev.config)?;
            let stats = net.stats_handle();
            let mac = net.mac();
            let (slot, transport) = virtio.attach(Box::new(net))?;
            net_devices.push(NetDeviceInfo {
                slot,
                stats,
                mac,
                interface,
                _transport: transport,
            });
        }
        #[cfg(target_os = "linux")]
        let vsock = match cfg.vsock.take() {
            Some(config) => {
                let device = crate::devices::virtio::vsock::Vsock::new(config)?;
                let host = device.host();
                let guest_cid = device.guest_cid();
                let (slot, transport) = virtio.attach(Box::new(device))?;
                Some(VsockInfo {
                    slot,
                    host,
                    guest_cid,
                    _transport: transport,
                })
            }
            None => None,
        };
        #[cfg(target_os = "linux")]
        let queue_events = virtio.queue_events;
        Ok(Devices {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            ioapic,
            block_devices,
            net_devices,
            #[cfg(target_os = "linux")]
            vsock,
            #[cfg(target_os = "linux")]
            queue_events,
        })
    }

    /// Starts the `smolvm-devices` event loop when any ioeventfd was registered.
    fn start_loop(&mut self) -> Result<Option<DeviceLoop>> {
        #[cfg(target_os = "linux")]
        {
            let events = std::mem::take(&mut self.queue_events);
            if !events.is_empty() {
                return DeviceLoop::start(events).map(Some);
            }
        }
        Ok(None)
    }
}

/// Spawns one thread per vCPU, waits until every vCPU exists (creating the irqchip then where
/// the backend needs it after the vCPUs), and lets them run. On any failure the threads are
/// told to give up and are joined before the error is returned.
fn start_vcpus(
    cfg: &VmBuilder,
    vm: &Arc<dyn Vm>,
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))] boot_state: BootState,
    devices: &Devices,
    control: &Arc<Control>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let startup = Startup::new(cfg.vcpus);
    let mut threads = Vec::with_capacity(cfg.vcpus as usize);
    let mut first_error = None;
    for id in 0..cfg.vcpus {
        let ctx = VcpuContext {
            id,
            count: cfg.vcpus,
            vm: vm.clone(),
            // Only the boot CPU starts at the kernel entry; the others wait for INIT/SIPI
            // like real hardware, so the guest brings them up itself.
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            boot: (id == 0).then_some(boot_state),
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            ioapic: devices.ioapic.clone(),
            control: control.clone(),
        };
        match vcpu_thread::spawn(ctx, startup.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                first_error = Some(Error::Thread(e));
                break;
            }
        }
    }
    let mut kickers = Vec::with_capacity(threads.len());
    for r in startup.collect(threads.len()) {
        match r {
            Ok(k) => kickers.push(k),
            Err(e) => {
                first_error.get_or_insert(Error::Hypervisor(e));
            }
        }
    }
    if first_error.is_none() && vm.irqchip_order() == IrqchipOrder::AfterVcpus {
        if let Err(e) = vm.create_irqchip(cfg.irqchip) {
            first_error = Some(e.into());
        }
    }
    control.set_kickers(kickers);
    if let Some(e) = first_error {
        startup.decide(false);
        for t in threads {
            let _ = t.join();
        }
        return Err(e);
    }
    startup.decide(true);
    Ok(threads)
}

/// Loads the kernel and initrd and writes the platform tables the kernel reads; returns the
/// boot CPU's register state.
#[cfg(target_arch = "x86_64")]
fn load_guest(cfg: &VmBuilder, memory: &GuestMemory) -> Result<BootState> {
    let kernel_path = cfg.kernel.as_deref().expect("validated");
    let kernel = crate::boot::load_kernel(memory, kernel_path)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(crate::boot::load_initrd(memory, p, &kernel)?),
        None => None,
    };
    Ok(crate::arch::x86_64::configure_system(
        memory,
        &kernel,
        &cfg.cmdline,
        initrd,
        cfg.vcpus,
    )?)
}

/// aarch64: the kernel `Image`, initrd and device tree; see `boot_aarch64`.
#[cfg(target_arch = "aarch64")]
fn load_guest(cfg: &VmBuilder, memory: &GuestMemory) -> Result<BootState> {
    super::boot_aarch64::load_guest(cfg, memory)
}

/// The boot path (kernel formats, platform tables, boot CPU state) exists for x86_64 and
/// aarch64 guests only, and a guest runs on the host's architecture.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn load_guest(_cfg: &VmBuilder, _memory: &GuestMemory) -> Result<()> {
    Err(Error::Hypervisor(HypervisorError::Unsupported(
        "booting a guest on this host architecture (only x86_64 guests can be booted so far)",
    )))
}

/// The console UART's interrupt line (ISA IRQ 4: COM1).
#[cfg(not(target_arch = "aarch64"))]
const SERIAL_IRQ: u32 = legacy::COM1_IRQ;

fn create_memory(size: u64) -> Result<GuestMemory> {
    #[cfg(target_arch = "aarch64")]
    let ranges = super::boot_aarch64::guest_ram_ranges(size);
    #[cfg(not(target_arch = "aarch64"))]
    let ranges = layout::guest_ram_ranges(size);
    let ranges: Vec<(GuestAddress, usize)> = ranges
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    Ok(memory::create(&ranges)?)
}

fn map_memory(vm: &dyn Vm, memory: &GuestMemory) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Config(format!("guest memory region has no host address: {e}")))?;
        let r = MemoryRegion {
            slot: slot as u32,
            guest_addr: region.start_addr().0,
            size: region.len(),
            host_addr: host as u64,
            read_only: false,
        };
        // SAFETY: the region belongs to `memory`, which the VM's `Resources` keep alive until
        // after every vCPU thread has ended and the VM (the last user) is dropped.
        unsafe { vm.map_memory(r) }?;
    }
    Ok(())
}

fn check_not_ram(memory: &GuestMemory, base: u64, len: u64) -> Result<()> {
    let end = base.saturating_add(len);
    for r in memory.iter() {
        let (rs, re) = (r.start_addr().0, r.start_addr().0 + r.len());
        if base < re && rs < end {
            return Err(Error::Config(format!(
                "MMIO device at {base:#x}+{len:#x} overlaps guest RAM {rs:#x}..{re:#x}; place it \
                 in the MMIO gap ({:#x}..{:#x})",
                layout::MMIO_DEVICES_START,
                layout::IOAPIC_START
            )));
        }
    }
    Ok(())
}

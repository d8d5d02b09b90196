//! [`VmBuilder`]: what a VM is made of, with sensible defaults.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::KernelCmdline;
use crate::devices::legacy::ConsoleSink;
use crate::devices::virtio::block::Disk;
use crate::devices::BusDevice;
use crate::hypervisor::{Hypervisor, IrqchipMode};

/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// How often a waiting caller checks whether every vCPU is halted for good.
pub const DEFAULT_HALT_PROBE: Duration = Duration::from_millis(200);

/// A device the caller adds to a bus.
pub(super) struct ExtraDevice {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn BusDevice>>,
}

/// Configures and starts a VM.
///
/// Defaults: 128 MiB, 1 vCPU, [`KernelCmdline::default`] (tuned for fast boot), console
/// output discarded, the process-wide shared hypervisor, [`IrqchipMode::InKernel`].
///
/// # Example
/// ```no_run
/// use smolvm::{boot::KernelCmdline, VmBuilder};
///
/// let mut cmdline = KernelCmdline::default();
/// cmdline.append("init=/bin/sh");
/// let vm = VmBuilder::new()
///     .memory_mib(256)
///     .vcpus(2)
///     .kernel("/path/to/vmlinux")
///     .initrd("/path/to/initrd.cpio")
///     .cmdline(cmdline)
///     .console(std::io::stdout())
///     .start()?;
/// println!("guest ended: {}", vm.wait());
/// # Ok::<(), smolvm::Error>(())
/// ```
pub struct VmBuilder {
    pub(super) hypervisor: Option<Arc<dyn Hypervisor>>,
    pub(super) memory_mib: u64,
    pub(super) vcpus: u32,
    pub(super) kernel: Option<PathBuf>,
    pub(super) initrd: Option<PathBuf>,
    pub(super) cmdline: KernelCmdline,
    pub(super) console: ConsoleSink,
    pub(super) pio_devices: Vec<ExtraDevice>,
    pub(super) mmio_devices: Vec<ExtraDevice>,
    pub(super) block_devices: Vec<Box<dyn Disk>>,
    pub(super) net_devices: Vec<super::NetDevice>,
    #[cfg(target_os = "linux")]
    pub(super) vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    pub(super) halt_probe: Option<Duration>,
    pub(super) require_hardware_virtualization: bool,
    pub(super) irqchip: IrqchipMode,
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline.to_string())
            .field("console", &self.console)
            .field("irqchip", &self.irqchip)
            .field("block_devices", &self.block_devices.len())
            .field("net_devices", &self.net_devices)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A builder with the defaults above.
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new();
    /// # drop(b);
    /// ```
    pub fn new() -> Self {
        VmBuilder {
            hypervisor: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            kernel: None,
            initrd: None,
            cmdline: KernelCmdline::default(),
            console: ConsoleSink::Discard,
            pio_devices: Vec::new(),
            mmio_devices: Vec::new(),
            block_devices: Vec::new(),
            net_devices: Vec::new(),
            #[cfg(target_os = "linux")]
            vsock: None,
            halt_probe: Some(DEFAULT_HALT_PROBE),
            require_hardware_virtualization: false,
            irqchip: IrqchipMode::InKernel,
        }
    }

    /// Uses `hv` instead of the process-wide default (see [`crate::hypervisor::open`]).
    ///
    /// # Example
    /// ```no_run
    /// let hv = smolvm::hypervisor::open()?;
    /// let b = smolvm::VmBuilder::new().hypervisor(hv);
    /// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
    /// ```
    pub fn hypervisor(mut self, hv: Arc<dyn Hypervisor>) -> Self {
        self.hypervisor = Some(hv);
        self
    }

    /// Guest memory in MiB (default 128). Memory is reserved lazily: the host only pays for
    /// pages the guest touches.
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().memory_mib(512);
    /// # drop(b);
    /// ```
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1). Each runs on its own thread.
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().vcpus(4);
    /// # drop(b);
    /// ```
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// The kernel: an uncompressed vmlinux ELF (PVH entry used when present) or a bzImage.
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().kernel("vmlinux");
    /// # drop(b);
    /// ```
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// An initial ramdisk (cpio archive, optionally compressed).
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().initrd("initrd.cpio.gz");
    /// # drop(b);
    /// ```
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Replaces the kernel command line (default: [`KernelCmdline::default`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let b = smolvm::VmBuilder::new().cmdline(KernelCmdline::default());
    /// # drop(b);
    /// ```
    pub fn cmdline(mut self, cmdline: KernelCmdline) -> Self {
        self.cmdline = cmdline;
        self
    }

    /// Sends guest console (COM1) output to `w`, byte by byte as the guest writes it.
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().console(std::io::stdout());
    /// # drop(b);
    /// ```
    pub fn console(mut self, w: impl Write + Send + 'static) -> Self {
        self.console = ConsoleSink::Writer(Box::new(w));
        self
    }

    /// Hands guest console output to `f`.
    ///
    /// # Example
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// let out = Arc::new(Mutex::new(Vec::new()));
    /// let o = out.clone();
    /// let b = smolvm::VmBuilder::new()
    ///     .console_callback(move |bytes| o.lock().unwrap().extend_from_slice(bytes));
    /// # drop(b);
    /// ```
    pub fn console_callback(mut self, f: impl FnMut(&[u8]) + Send + 'static) -> Self {
        self.console = ConsoleSink::Callback(Box::new(f));
        self
    }

    /// Adds a caller-provided device on x86 I/O ports `base .. base + len`. Start-up fails
    /// with [`crate::Error::Bus`] if the range overlaps a built-in device (COM1 0x3f8-0x3ff,
    /// i8042 0x60/0x64, PM1a control 0x604-0x605) or another caller device.
    ///
    /// # Example
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use smolvm::devices::BusDevice;
    ///
    /// struct DebugPort;
    /// impl BusDevice for DebugPort {
    ///     fn read(&mut self, _: u64, _: u64, d: &mut [u8]) { d.fill(0) }
    ///     fn write(&mut self, _: u64, _: u64, d: &[u8]) { eprintln!("guest: {d:?}") }
    /// }
    /// let b = smolvm::VmBuilder::new().pio_device(0x510, 4, Arc::new(Mutex::new(DebugPort)));
    /// # drop(b);
    /// ```
    pub fn pio_device(mut self, base: u16, len: u16, device: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.pio_devices.push(ExtraDevice {
            base: u64::from(base),
            len: u64::from(len),
            device,
        });
        self
    }

    /// Adds a caller-provided device at guest physical `base .. base + len`, which must not
    /// overlap guest RAM (use the MMIO gap below 4 GiB).
    ///
    /// # Example
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use smolvm::devices::BusDevice;
    ///
    /// struct Scratch([u8; 8]);
    /// impl BusDevice for Scratch {
    ///     fn read(&mut self, _: u64, o: u64, d: &mut [u8]) { d.fill(self.0[o as usize % 8]) }
    ///     fn write(&mut self, _: u64, o: u64, d: &[u8]) { self.0[o as usize % 8] = d[0] }
    /// }
    /// let b = smolvm::VmBuilder::new()
    ///     .mmio_device(0xd100_0000, 0x1000, Arc::new(Mutex::new(Scratch([0; 8]))));
    /// # drop(b);
    /// ```
    pub fn mmio_device(mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.mmio_devices.push(ExtraDevice { base, len, device });
        self
    }

    /// Adds a virtio-blk disk backed by `disk` (typically a
    /// [`DiskImage`](crate::devices::virtio::block::DiskImage)), on the virtio-mmio
    /// transport.
    ///
    /// May be called several times: devices get virtio-mmio slots in call order from
    /// [`MmioAllocator::x86_64`](crate::devices::virtio::MmioAllocator::x86_64) — the first at
    /// guest-physical 0xd0000000 with GSI 5, the second at 0xd0001000 with GSI 6, and so on —
    /// and each is announced to Linux with a `virtio_mmio.device=4K@0xd0000000:5` kernel
    /// parameter (the kernel needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`); it appears as
    /// `/dev/vda`, `/dev/vdb`, ... in that order. [`start`](Self::start) fails with
    /// [`crate::Error::Config`] when more devices are added than there are slots (19 on x86:
    /// GSIs 5-23).
    ///
    /// Queue notifications are caught by ioeventfds where the hypervisor has them and served
    /// on the VM's `smolvm-devices` thread; otherwise on the vCPU that wrote the notify
    /// register. The disk is dropped (files closed, a scratch overlay file deleted) when the
    /// VM's resources are released, i.e. when [`VmHandle::stop`](super::VmHandle::stop) or
    /// [`wait`](super::VmHandle::wait) returns.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::boot::KernelCmdline;
    /// use smolvm::devices::virtio::block::{DiskImage, DiskMode, OverlayTarget};
    ///
    /// // The shared base image stays untouched: guest writes go to a private scratch file.
    /// let scratch = OverlayTarget::scratch_file("/tmp/vm1-rootfs.overlay");
    /// let root = DiskImage::open("rootfs.ext4", DiskMode::Overlay(scratch))?;
    /// let data = DiskImage::open("data.img", DiskMode::ReadWrite)?;
    /// let mut cmdline = KernelCmdline::default();
    /// cmdline.append("root=/dev/vda rw");
    /// let vm = smolvm::VmBuilder::new()
    ///     .kernel("vmlinux")
    ///     .cmdline(cmdline)
    ///     .block_device(root) // /dev/vda: 0xd0000000, GSI 5
    ///     .block_device(data) // /dev/vdb: 0xd0001000, GSI 6
    ///     .start()?;
    /// println!("{}", vm.wait());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn block_device(mut self, disk: impl Disk + 'static) -> Self {
        self.block_devices.push(Box::new(disk));
        self
    }

    /// Adds a virtio-net card (see [`NetDevice`](super::NetDevice) for backends, MAC and rate
    /// limits). Cards take the virtio-mmio slots after the block devices, in the order added;
    /// the guest sees them as `eth0`, `eth1`, ... A TAP the VM creates
    /// ([`NetDevice::create_tap`](super::NetDevice::create_tap)) is removed when the VM stops.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new()
    ///     .kernel("vmlinux")
    ///     .net_device(smolvm::NetDevice::open_tap("tap0"))
    ///     .start()?;
    /// println!("guest MAC {:02x?}", vm.net_mac(0)?);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn net_device(mut self, device: super::NetDevice) -> Self {
        self.net_devices.push(device);
        self
    }

    /// Adds a virtio-vsock device: stream sockets between the guest (CID `config.guest_cid`,
    /// at least 3) and the host. The host side is reachable in-process
    /// ([`VmHandle::vsock_connect`](super::VmHandle::vsock_connect),
    /// [`VmHandle::vsock_listen`](super::VmHandle::vsock_listen), the agent calls such as
    /// [`VmHandle::exec`](super::VmHandle::exec)) and, with
    /// [`VsockConfig::uds_path`](crate::devices::virtio::vsock::VsockConfig::uds_path),
    /// through Firecracker-compatible Unix sockets. It takes the virtio-mmio slot after the
    /// block and network devices. A second call replaces the first.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use smolvm::devices::virtio::vsock::VsockConfig;
    /// let vm = smolvm::VmBuilder::new()
    ///     .kernel("vmlinux")
    ///     .vsock(VsockConfig::new(3).uds_path("/tmp/vm1.vsock"))
    ///     .start()?;
    /// vm.wait_agent_ready(Duration::from_secs(5))?;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    #[cfg(target_os = "linux")]
    pub fn vsock(mut self, config: crate::devices::virtio::vsock::VsockConfig) -> Self {
        self.vsock = Some(config);
        self
    }

    /// How often [`VmHandle::wait`](super::VmHandle::wait) checks whether every vCPU is halted
    /// with interrupts disabled (`None` turns the check off). Each check interrupts every vCPU
    /// once; the default is 200 ms. x86 only: on arm64 the check is always off (a vCPU there
    /// never counts as halted for good, so it could not end a VM).
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let b = smolvm::VmBuilder::new().halt_probe(Some(Duration::from_millis(50)));
    /// # drop(b);
    /// ```
    pub fn halt_probe(mut self, every: Option<Duration>) -> Self {
        self.halt_probe = every;
        self
    }

    /// Fails [`start`](Self::start) with [`crate::Error::SoftwareVirtualization`] on a host
    /// whose hypervisor cannot run an unmodified Linux kernel (e.g. `kvm_pvm`). Off by
    /// default, because small purpose-built guests run fine there (a warning is logged).
    ///
    /// # Example
    /// ```
    /// let b = smolvm::VmBuilder::new().require_hardware_virtualization(true);
    /// # drop(b);
    /// ```
    pub fn require_hardware_virtualization(mut self, yes: bool) -> Self {
        self.require_hardware_virtualization = yes;
        self
    }

    /// Which interrupt controller the VM gets (default [`IrqchipMode::InKernel`]: PIC, IOAPIC,
    /// LAPIC and PIT in the kernel, as under Firecracker).
    ///
    /// Pick [`IrqchipMode::Split`] for fast start-up and, above all, fast teardown: only the
    /// LAPICs stay in the kernel and smolvm emulates the IOAPIC
    /// ([`Ioapic`](crate::devices::legacy::Ioapic), on the MMIO bus at 0xfec00000), so
    /// stopping a VM takes well under a millisecond instead of 15-25 ms on KVM. The guest sees
    /// no 8259 PIC and no 8254 PIT: Linux boots like under cloud-hypervisor, taking its TSC
    /// frequency from kvm-clock and its tick from the TSC-deadline LAPIC timer (smolvm
    /// advertises TSC-deadline and ARAT in CPUID for this). A kernel without kvm-clock, or a
    /// guest that needs the PIT or the PIC, must keep the default: Linux 6.1 with no PIT and
    /// no known TSC frequency hangs in early timer set-up (seen under QEMU). Split mode has
    /// not yet booted real Linux on hardware KVM in our tests.
    /// Interrupt lines ([`VmHandle::interrupt_line`](super::VmHandle::interrupt_line), the
    /// serial console's IRQ 4) work in both modes once the guest programs the IOAPIC pin.
    /// arm64 hosts ignore the setting (the GIC is always in the kernel).
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::hypervisor::IrqchipMode;
    /// let vm = smolvm::VmBuilder::new()
    ///     .kernel("vmlinux")
    ///     .irqchip(IrqchipMode::Split)
    ///     .start()?;
    /// vm.stop(); // fast: no in-kernel PIC/IOAPIC/PIT to tear down
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn irqchip(mut self, mode: IrqchipMode) -> Self {
        self.irqchip = mode;
        self
    }
}

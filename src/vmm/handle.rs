//! [`VmHandle`]: a running VM.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::control::Control;
use super::device_loop::DeviceLoop;
use super::ExitReason;
use crate::devices::legacy::{Ioapic, Serial};
use crate::devices::virtio::block::BlockStats;
use crate::devices::virtio::mmio::{MmioSlot, MmioTransport};
use crate::devices::virtio::net::{NetStats, NetStatsHandle};
use crate::devices::InterruptLine;
use crate::hypervisor::Vm;
use crate::memory::GuestMemory;
use crate::{Error, Result};

/// Where a VM is in its lifecycle.
///
/// # Example
/// ```no_run
/// use smolvm::{VmBuilder, VmState};
/// let vm = VmBuilder::new().kernel("vmlinux").start()?;
/// assert_eq!(vm.state(), VmState::Running);
/// vm.pause()?;
/// assert_eq!(vm.state(), VmState::Paused);
/// let reason = vm.stop();
/// assert_eq!(vm.state(), VmState::Exited(reason));
/// # Ok::<(), smolvm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// vCPUs are running guest code.
    Running,
    /// vCPUs are parked; the guest sees no time pass in its instruction stream.
    Paused,
    /// The VM stopped for good.
    Exited(ExitReason),
}

/// What a VM owns while it exists; dropped as a unit once every vCPU thread has ended.
pub(super) struct Resources {
    pub vm: Arc<dyn Vm>,
    pub memory: GuestMemory,
    pub serial: Arc<Mutex<Serial>>,
    /// The userspace IOAPIC ([`IrqchipMode::Split`](crate::hypervisor::IrqchipMode::Split)).
    pub ioapic: Option<Arc<Mutex<Ioapic>>>,
    /// The virtio-blk devices, in [`VmBuilder::block_device`](super::VmBuilder::block_device)
    /// order.
    pub block_devices: Vec<BlockDeviceInfo>,
    /// The virtio-net devices, in [`VmBuilder::net_device`](super::VmBuilder::net_device)
    /// order.
    pub net_devices: Vec<NetDeviceInfo>,
    /// The vsock device ([`VmBuilder::vsock`](super::VmBuilder::vsock)).
    #[cfg(target_os = "linux")]
    pub vsock: Option<VsockInfo>,
}

/// The VM's vsock device.
#[cfg(target_os = "linux")]
pub(super) struct VsockInfo {
    /// Where the guest finds it.
    pub slot: MmioSlot,
    /// The in-process host side (connect, listen).
    pub host: crate::devices::virtio::vsock::VsockHost,
    /// The guest's context id.
    pub guest_cid: u64,
    /// Keeps the device (its muxer, sockets and socket files) alive as long as the VM.
    pub _transport: Arc<Mutex<MmioTransport>>,
}

/// A virtio-net device of the VM.
pub(super) struct NetDeviceInfo {
    /// Where the guest finds it.
    pub slot: MmioSlot,
    /// Its counters (atomics the device updates; read without the transport lock).
    pub stats: NetStatsHandle,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The host interface behind it (TAP backends).
    pub interface: Option<String>,
    /// Keeps the device (and its TAP, which a VM-created TAP's lifetime follows) alive
    /// exactly as long as the VM's resources.
    pub _transport: Arc<Mutex<MmioTransport>>,
}

/// A virtio-blk device of the VM.
pub(super) struct BlockDeviceInfo {
    /// Where the guest finds it.
    pub slot: MmioSlot,
    /// Its counters, published by the device after each notification.
    pub stats: Arc<Mutex<BlockStats>>,
    /// Keeps the device (and its disk) alive exactly as long as the VM's resources.
    pub _transport: Arc<Mutex<MmioTransport>>,
}

/// A running VM, returned by [`VmBuilder::start`](super::VmBuilder::start).
///
/// Every method takes `&self`, so one thread can [`wait`](Self::wait) while another
/// [`stop`](Self::stop)s. Dropping the handle stops the VM and joins its threads.
///
/// # Example
/// ```no_run
/// use std::time::Duration;
/// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
/// vm.pause()?;
/// vm.resume()?;
/// match vm.wait_timeout(Duration::from_secs(5)) {
///     Some(reason) => println!("guest ended: {reason}"),
///     None => println!("stopped: {}", vm.stop()),
/// }
/// # Ok::<(), smolvm::Error>(())
/// ```
pub struct VmHandle {
    pub(super) control: Arc<Control>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    /// The `smolvm-devices` thread, when any virtio queue has an ioeventfd.
    pub(super) device_loop: Mutex<Option<DeviceLoop>>,
    pub(super) resources: Mutex<Option<Resources>>,
    pub(super) halt_probe: Option<Duration>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    /// Blocks until the VM stops, joins every vCPU thread, releases the VM's resources and
    /// returns why it stopped. Calling it again returns the same reason.
    ///
    /// While waiting it checks every [`halt_probe`](super::VmBuilder::halt_probe) interval
    /// whether all vCPUs are halted with interrupts disabled, and ends the VM with
    /// [`ExitReason::Halted`] if so.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// assert!(vm.wait().is_guest_shutdown());
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn wait(&self) -> ExitReason {
        let reason = loop {
            if let Some(r) = self.control.wait_exit(None, self.halt_probe) {
                break r;
            }
        };
        self.finish();
        reason
    }

    /// Like [`wait`](Self::wait), but gives up after `timeout` and returns `None` if the VM is
    /// still running.
    ///
    /// # Example
    /// ```no_run
    /// # use std::time::Duration;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// if vm.wait_timeout(Duration::from_secs(1)).is_none() {
    ///     vm.stop();
    /// }
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.control.wait_exit(Some(timeout), self.halt_probe)?;
        self.finish();
        Some(reason)
    }

    /// Stops the VM (if it is still running), joins every vCPU thread, releases every
    /// resource (memory, file descriptors) and returns why the VM ended: [`ExitReason::Stopped`]
    /// unless it had already ended on its own.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// println!("{}", vm.stop());
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn stop(&self) -> ExitReason {
        self.control.request_exit(ExitReason::Stopped);
        self.finish();
        self.control.exit_reason().unwrap_or(ExitReason::Stopped)
    }

    /// Stops guest execution: returns once no vCPU runs guest code. Device state and guest
    /// memory stay as they are until [`resume`](Self::resume).
    ///
    /// # Errors
    /// [`Error::InvalidState`] if the VM has already exited.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// vm.pause()?;
    /// assert_eq!(vm.state(), smolvm::VmState::Paused);
    /// vm.resume()?;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn pause(&self) -> Result<()> {
        if self.control.pause() {
            Ok(())
        } else {
            Err(Error::InvalidState {
                op: "pause",
                state: "exited",
            })
        }
    }

    /// Lets a paused VM run again. Resuming a running VM does nothing.
    ///
    /// # Errors
    /// [`Error::InvalidState`] if the VM has already exited.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// vm.pause()?;
    /// vm.resume()?;
    /// assert_eq!(vm.state(), smolvm::VmState::Running);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn resume(&self) -> Result<()> {
        if self.control.exit_reason().is_some() {
            return Err(Error::InvalidState {
                op: "resume",
                state: "exited",
            });
        }
        self.control.resume();
        Ok(())
    }

    /// Why the VM stopped, `None` while it runs or is paused.
    #[cfg(target_os = "linux")]
    pub(super) fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit_reason()
    }

    /// The VM's current state.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// println!("{:?}", vm.state());
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn state(&self) -> VmState {
        match self.control.exit_reason() {
            Some(r) => VmState::Exited(r),
            None if self.control.is_paused() => VmState::Paused,
            None => VmState::Running,
        }
    }

    /// Sends `input` to the guest's serial console. Returns how many bytes the UART's 64-byte
    /// receive FIFO accepted; send the rest after the guest has read some.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited; a hypervisor error if the receive interrupt
    /// could not be raised.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// let n = vm.send_console_input(b"ls\n")?;
    /// # let _ = n;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn send_console_input(&self, input: &[u8]) -> Result<usize> {
        let serial = self.with_resources("send console input", |r| r.serial.clone())?;
        let mut serial = serial.lock().unwrap_or_else(|e| e.into_inner());
        serial
            .enqueue_input(input)
            .map_err(|e| crate::hypervisor::HypervisorError::backend("raise serial IRQ", e).into())
    }

    /// An interrupt line the host can raise into the guest (through irqfd where the
    /// hypervisor supports it). `gsi` is an IOAPIC pin on x86 (0-23).
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited; a hypervisor error if the line cannot be
    /// registered.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// let line = vm.interrupt_line(10)?;
    /// line.trigger()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn interrupt_line(&self, gsi: u32) -> Result<InterruptLine> {
        let vm = self.with_resources("create an interrupt line", |r| r.vm.clone())?;
        Ok(InterruptLine::new(&vm, gsi)?)
    }

    /// The VM at the hypervisor layer, for what the handle does not wrap (MSIs, ioeventfds).
    /// Holding it keeps the VM's kernel objects alive after the VM stops.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited and its resources were released.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::hypervisor::Msi;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// // Vector 0x40, fixed delivery, to APIC id 0.
    /// vm.vm()?.signal_msi(Msi { address: 0xfee0_0000, data: 0x40, devid: None })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn vm(&self) -> Result<Arc<dyn Vm>> {
        self.with_resources("access the VM", |r| r.vm.clone())
    }

    /// The userspace IOAPIC of a VM started with
    /// [`IrqchipMode::Split`](crate::hypervisor::IrqchipMode::Split) (`None` with the in-kernel
    /// irqchip), for level-triggered devices the caller runs itself
    /// ([`Ioapic::set_line`]) and for inspecting the guest's redirection table.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited and its resources were released.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::hypervisor::IrqchipMode;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").irqchip(IrqchipMode::Split).start()?;
    /// if let Some(ioapic) = vm.ioapic()? {
    ///     ioapic.lock().unwrap().set_line(11, true)?; // a level-triggered device asserts pin 11
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ioapic(&self) -> Result<Option<Arc<Mutex<Ioapic>>>> {
        self.with_resources("access the IOAPIC", |r| r.ioapic.clone())
    }

    /// The guest's memory, for inspection or for devices the caller runs itself.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited and its memory was released.
    ///
    /// # Example
    /// ```no_run
    /// use vm_memory::{Bytes, GuestAddress};
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").start()?;
    /// let mem = vm.memory()?;
    /// let magic: u32 = mem.read_obj(GuestAddress(0x7000 + 0x202)).unwrap();
    /// # let _ = magic;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn memory(&self) -> Result<GuestMemory> {
        self.with_resources("access memory", |r| r.memory.clone())
    }

    /// The counters of the `index`-th block device (in
    /// [`VmBuilder::block_device`](super::VmBuilder::block_device) order): requests served,
    /// bytes moved, errors. Updated after each batch of requests the device serves.
    ///
    /// # Errors
    /// [`Error::Config`] if there is no block device `index`; [`Error::InvalidState`] after
    /// the VM exited and its devices were released.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::virtio::block::{DiskImage, DiskMode};
    /// let disk = DiskImage::open("data.img", DiskMode::ReadOnly)?;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").block_device(disk).start()?;
    /// let stats = vm.block_stats(0)?;
    /// println!("{} reads, {} bytes", stats.reads, stats.bytes_read);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn block_stats(&self, index: usize) -> Result<BlockStats> {
        let (stats, count) = self.with_resources("read block device stats", |r| {
            (
                r.block_devices.get(index).map(|d| d.stats.clone()),
                r.block_devices.len(),
            )
        })?;
        let stats = stats.ok_or_else(|| {
            Error::Config(format!(
                "no block device {index}: the VM has {count} (indices from 0)"
            ))
        })?;
        let s = *stats.lock().unwrap_or_else(|e| e.into_inner());
        Ok(s)
    }

    /// Where the guest finds the `index`-th block device (its virtio-mmio window and GSI),
    /// `None` if there is no such device.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited and its devices were released.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::virtio::block::{DiskImage, DiskMode};
    /// let disk = DiskImage::open("data.img", DiskMode::ReadOnly)?;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").block_device(disk).start()?;
    /// assert_eq!(vm.block_slot(0)?.map(|s| s.addr), Some(0xd000_0000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn block_slot(&self, index: usize) -> Result<Option<MmioSlot>> {
        self.with_resources("read block device slots", |r| {
            r.block_devices.get(index).map(|d| d.slot)
        })
    }

    /// Counters of the `index`-th network card (in
    /// [`VmBuilder::net_device`](super::VmBuilder::net_device) order): frames and bytes each
    /// way, and every drop by reason.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no such device, [`Error::InvalidState`] after the VM
    /// exited.
    ///
    /// # Example
    /// ```no_run
    /// let vm = smolvm::VmBuilder::new()
    ///     .kernel("vmlinux")
    ///     .net_device(smolvm::NetDevice::open_tap("tap0"))
    ///     .start()?;
    /// let s = vm.net_stats(0)?;
    /// println!("rx {} tx {} dropped {}", s.rx_frames, s.tx_frames, s.tx_dropped());
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn net_stats(&self, index: usize) -> Result<NetStats> {
        self.with_net(index, "read network device stats", |d| d.stats.snapshot())
    }

    /// The guest MAC address of the `index`-th network card.
    ///
    /// # Errors
    /// As [`net_stats`](Self::net_stats).
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// let mac = vm.net_mac(0)?;
    /// assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn net_mac(&self, index: usize) -> Result<[u8; 6]> {
        self.with_net(index, "read a network device's MAC", |d| d.mac)
    }

    /// The host interface (TAP) behind the `index`-th network card, `None` for a custom
    /// backend.
    ///
    /// # Errors
    /// As [`net_stats`](Self::net_stats).
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// println!("guest traffic on {:?}", vm.net_interface_name(0)?);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn net_interface_name(&self, index: usize) -> Result<Option<String>> {
        self.with_net(index, "read a network device's interface", |d| {
            d.interface.clone()
        })
    }

    /// Where the guest finds the `index`-th network card, `None` if there is no such device.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited.
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// println!("{:?}", vm.net_slot(0)?);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn net_slot(&self, index: usize) -> Result<Option<MmioSlot>> {
        self.with_resources("read network device slots", |r| {
            r.net_devices.get(index).map(|d| d.slot)
        })
    }

    fn with_net<T>(
        &self,
        index: usize,
        op: &'static str,
        f: impl FnOnce(&NetDeviceInfo) -> T,
    ) -> Result<T> {
        self.with_resources(op, |r| {
            r.net_devices.get(index).map(f).ok_or_else(|| {
                Error::Config(format!(
                    "no network device {index}: the VM has {} (indices from 0)",
                    r.net_devices.len()
                ))
            })
        })?
    }

    pub(super) fn with_resources<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Resources) -> T,
    ) -> Result<T> {
        let res = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        res.as_ref().map(f).ok_or(Error::InvalidState {
            op,
            state: "exited",
        })
    }

    /// Joins the vCPU threads, stops and joins the device event loop, and drops the VM's
    /// resources (devices included). Idempotent.
    fn finish(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() == me {
                // Called from a vCPU thread (a device or console callback stopping the VM):
                // it cannot join itself; it leaves its run loop as soon as this call returns
                // because the stop flag is set.
                continue;
            }
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        // After the vCPUs: no new notification can arrive once they are gone.
        let device_loop = self
            .device_loop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(l) = device_loop {
            l.stop();
        }
        let resources = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(resources);
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.control.request_exit(ExitReason::Stopped);
        self.finish();
    }
}

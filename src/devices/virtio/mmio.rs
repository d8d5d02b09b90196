//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! Each virtio device gets a 4 KiB window of guest-physical address space ([`MmioSlot`]) and
//! one interrupt line. The driver programs the device through 32-bit registers at the start of
//! the window; the device-specific configuration space starts at [`CONFIG_SPACE_OFFSET`].
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | MagicValue (`"virt"`, [`MMIO_MAGIC`]) | R |
//! | 0x004 | Version ([`MMIO_VERSION`] = 2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID ([`MMIO_VENDOR_ID`], `"SMVM"`) | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 / 0x034 / 0x038 | QueueSel / QueueNumMax / QueueNum | W / R / W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify ([`QUEUE_NOTIFY_OFFSET`]) | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status | RW |
//! | 0x080..0x0a4 | QueueDesc / QueueDriver / QueueDevice, low and high halves | W |
//! | 0x0ac..0x0bc | SHMSel / SHMLen / SHMBase: no shared-memory regions (lengths read all-ones) | W / R |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device configuration space, forwarded to [`VirtioDevice::read_config`] / [`VirtioDevice::write_config`] | RW, any size |
//!
//! Everything the guest writes is untrusted. Register accesses other than aligned 4-byte
//! ones, unknown offsets, reads of write-only and writes of read-only registers read as zero
//! or are dropped (logged at debug level); nothing panics. The driver handshake (3.1.1) is
//! enforced:
//!
//! - Status bits are set in order: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK (several in
//!   one write are fine if the result is such a prefix). A write that clears a bit or skips a
//!   step is ignored, except that FAILED is always recorded.
//! - FEATURES_OK is only kept when the driver's features are a subset of the device's and
//!   include [`VIRTIO_F_VERSION_1`]; otherwise the driver's re-read of Status finds it clear.
//!   DriverFeatures is writable only before FEATURES_OK.
//! - Queue registers are writable only between FEATURES_OK and DRIVER_OK; QueueNum and the
//!   ring addresses only while the selected queue is not ready. QueueNum must be a power of
//!   two no larger than QueueNumMax.
//! - DRIVER_OK checks every ready queue with [`Queue::is_valid`] and calls
//!   [`VirtioDevice::activate`] with copies of the queues (`indirect` / `event_idx` set from
//!   the negotiated features). If a queue is invalid or the device refuses, DRIVER_OK is not
//!   set and DEVICE_NEEDS_RESET is.
//! - Writing 0 to Status resets the device ([`VirtioDevice::reset`]), the queues, features,
//!   selectors and interrupt status. ConfigGeneration is kept: it only ever grows, so a driver
//!   that read the configuration across a reset still sees a change.
//!
//! Interrupts: the device signals through the [`VirtioInterrupt`] it was activated with,
//! which sets InterruptStatus bits with atomics (no transport lock needed, so a device thread
//! may signal while a vCPU is in the register window) and raises the line.
//!
//! # Example
//! Build a transport for a device and put it on the MMIO bus at the next free slot:
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use smolvm::devices::virtio::mmio::{MmioAllocator, MmioTransport};
//! use smolvm::devices::{Bus, InterruptLine};
//! # fn device() -> Box<dyn smolvm::devices::virtio::VirtioDevice> { unimplemented!() }
//! # let vm: Arc<dyn smolvm::hypervisor::Vm> = unimplemented!();
//! # let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
//! let mut slots = MmioAllocator::x86_64();
//! let slot = slots.allocate()?;
//! let line = InterruptLine::new(&vm, slot.irq)?;
//! let transport = Arc::new(Mutex::new(MmioTransport::new(device(), mem, line)));
//! let mut bus = Bus::new("mmio");
//! bus.insert(slot.addr, slot.len, transport)?;
//! let cmdline_arg = slot.kernel_cmdline_arg(); // "virtio_mmio.device=4K@0xd0000000:5"
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use super::{
    ActivateContext, Queue, VirtioDevice, VirtioInterrupt, STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::arch::x86_64::layout;
use crate::devices::{BusDevice, InterruptLine};
use crate::memory::GuestMemory;

/// MagicValue: `"virt"` read as a little-endian `u32`.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version: 2, the virtio 1.x ("modern") register layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID smolvm reports: `"SMVM"` as a little-endian `u32` (QEMU uses `"QEMU"`,
/// 0x554D4551). Linux does not interpret it.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"SMVM");
/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify in the window: register an ioeventfd at `slot.addr +
/// QUEUE_NOTIFY_OFFSET` (4 bytes, datamatch = queue index) and call
/// [`MmioTransport::notify_queue`] when it fires.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
/// Offset where the device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// InterruptStatus bit: a used ring was updated.
pub const INTERRUPT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration space changed (or DEVICE_NEEDS_RESET was set).
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

// Register offsets (section 4.2.2).
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;

/// Status bits the driver sets, in the order it must set them.
const HANDSHAKE: [u8; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];
const HANDSHAKE_MASK: u8 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

/// Raises a device's interrupt line. [`MmioTransport::new`] wraps an [`InterruptLine`];
/// tests and fuzzers pass a closure.
///
/// # Example
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use smolvm::devices::virtio::mmio::IrqTrigger;
/// let count = Arc::new(AtomicU32::new(0));
/// let c = count.clone();
/// let trigger: IrqTrigger = Arc::new(move || {
///     c.fetch_add(1, Ordering::SeqCst);
/// });
/// trigger();
/// assert_eq!(count.load(Ordering::SeqCst), 1);
/// ```
pub type IrqTrigger = Arc<dyn Fn() + Send + Sync>;

/// The part of the transport the device's [`VirtioInterrupt`] shares: everything a device may
/// change without the transport lock.
struct Shared {
    /// Device status register (the device sets DEVICE_NEEDS_RESET here).
    status: AtomicU8,
    interrupt_status: AtomicU32,
    config_generation: AtomicU32,
    trigger: IrqTrigger,
}

impl Shared {
    fn raise(&self, bit: u32) {
        self.interrupt_status.fetch_or(bit, Ordering::SeqCst);
        (self.trigger)();
    }
}

impl VirtioInterrupt for Shared {
    fn signal_used_queue(&self, _queue: u16) {
        self.raise(INTERRUPT_USED_RING);
    }

    fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn set_needs_reset(&self) {
        let _ = self
            .status
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s & STATUS_DRIVER_OK != 0).then_some(s | STATUS_DEVICE_NEEDS_RESET)
            });
        self.signal_config_change();
    }
}

/// The transport's state as plain data, for inspection and (later) snapshots.
///
/// `queues` is the driver's configuration as programmed through the registers; the ring
/// positions (`next_avail`, `next_used`) of a live device are in the device's own copies.
///
/// # Example
/// See [`MmioTransport::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmioTransportState {
    /// The device ID (DeviceID register).
    pub device_type: u32,
    /// The Status register.
    pub status: u8,
    /// The feature bits the device offers.
    pub device_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// The feature bits the driver wrote (negotiated once FEATURES_OK is set).
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// One entry per device queue, as the driver configured it.
    pub queues: Vec<Queue>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// [`VirtioDevice::activate`] succeeded and no reset happened since.
    pub activated: bool,
}

/// A virtio device behind a virtio-mmio (version 2) register window. Insert it on the MMIO
/// [`Bus`](crate::devices::Bus) at an [`MmioSlot`].
///
/// # Example
/// The start of a Linux driver's probe against a device with no queues:
/// ```
/// use std::sync::Arc;
/// use smolvm::devices::virtio::mmio::{MmioTransport, MMIO_MAGIC};
/// use smolvm::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, DEVICE_ID_RNG};
/// use smolvm::devices::BusDevice;
///
/// struct Nothing;
/// impl VirtioDevice for Nothing {
///     fn device_type(&self) -> u32 { DEVICE_ID_RNG }
///     fn queue_max_sizes(&self) -> &[u16] { &[] }
///     fn device_features(&self) -> u64 { 1 << 32 }
///     fn read_config(&self, _: u64, data: &mut [u8]) { data.fill(0) }
///     fn write_config(&mut self, _: u64, _: &[u8]) {}
///     fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> { Ok(()) }
///     fn queue_notify(&mut self, _: u16) -> bool { false }
///     fn reset(&mut self) {}
/// }
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
/// let mut t = MmioTransport::with_trigger(Box::new(Nothing), mem, Arc::new(|| {}));
/// let mut v = [0u8; 4];
/// t.read(0, 0x000, &mut v);
/// assert_eq!(u32::from_le_bytes(v), MMIO_MAGIC);
/// t.read(0, 0x008, &mut v);
/// assert_eq!(u32::from_le_bytes(v), DEVICE_ID_RNG);
/// ```
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    shared: Arc<Shared>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device` over guest memory `mem`, raising `line` on interrupts (a
    /// failed trigger is logged and otherwise ignored).
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, line: InterruptLine) -> Self {
        let trigger: IrqTrigger = Arc::new(move || {
            if let Err(e) = line.trigger() {
                log::warn!("virtio-mmio: raising GSI {}: {e}", line.gsi());
            }
        });
        Self::with_trigger(device, mem, trigger)
    }

    /// A transport that calls `trigger` to raise its interrupt (tests, fuzzing, or a backend
    /// with its own interrupt plumbing).
    ///
    /// # Example
    /// See [`MmioTransport`].
    pub fn with_trigger(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        trigger: IrqTrigger,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect();
        MmioTransport {
            device,
            mem,
            shared: Arc::new(Shared {
                status: AtomicU8::new(0),
                interrupt_status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                trigger,
            }),
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        }
    }

    /// The device behind the transport.
    ///
    /// # Example
    /// `assert_eq!(transport.device().device_type(), DEVICE_ID_BLOCK);`
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The Status register (device status bits of [`super`]).
    ///
    /// # Example
    /// `assert_eq!(transport.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);`
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::SeqCst)
    }

    /// Whether the device was activated (DRIVER_OK accepted) and not reset since.
    ///
    /// # Example
    /// `if transport.is_activated() { /* the device's queues are live */ }`
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The transport's state as plain data.
    ///
    /// # Example
    /// ```
    /// # use std::sync::Arc;
    /// # use smolvm::devices::virtio::mmio::MmioTransport;
    /// # use smolvm::devices::virtio::{ActivateContext, ActivateError, VirtioDevice};
    /// # struct Nothing;
    /// # impl VirtioDevice for Nothing {
    /// #     fn device_type(&self) -> u32 { 4 }
    /// #     fn queue_max_sizes(&self) -> &[u16] { &[64] }
    /// #     fn device_features(&self) -> u64 { 1 << 32 }
    /// #     fn read_config(&self, _: u64, data: &mut [u8]) { data.fill(0) }
    /// #     fn write_config(&mut self, _: u64, _: &[u8]) {}
    /// #     fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> { Ok(()) }
    /// #     fn queue_notify(&mut self, _: u16) -> bool { false }
    /// #     fn reset(&mut self) {}
    /// # }
    /// # let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
    /// let t = MmioTransport::with_trigger(Box::new(Nothing), mem, Arc::new(|| {}));
    /// let s = t.state();
    /// assert_eq!((s.status, s.queues.len(), s.queues[0].max_size), (0, 1, 64));
    /// ```
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status(),
            device_features: self.device.device_features(),
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            interrupt_status: self.shared.interrupt_status.load(Ordering::SeqCst),
            config_generation: self.shared.config_generation.load(Ordering::SeqCst),
            activated: self.activated,
        }
    }

    /// The driver notified queue `index` (a QueueNotify write, or its ioeventfd fired):
    /// forwarded to [`VirtioDevice::queue_notify`] if the device is active and the queue
    /// exists, ignored otherwise.
    ///
    /// Returns the device's answer: `true` when it stopped early with work left on the queue,
    /// so the caller must call again (an event loop after serving its other events; the MMIO
    /// exit path of a QueueNotify write loops until `false`). `false` when the notification
    /// was ignored.
    ///
    /// # Example
    /// `let more = transport.lock().unwrap().notify_queue(0); // from the event loop`
    pub fn notify_queue(&mut self, index: u32) -> bool {
        if !self.activated {
            log::debug!("virtio-mmio: notify of queue {index} before DRIVER_OK ignored");
            return false;
        }
        match u16::try_from(index) {
            Ok(q) if usize::from(q) < self.queues.len() => self.device.queue_notify(q),
            _ => {
                log::debug!("virtio-mmio: notify of unknown queue {index} ignored");
                false
            }
        }
    }

    /// A host source of the device ([`VirtioDevice::host_events`]) is ready: forwarded to
    /// [`VirtioDevice::host_event`] whether or not the driver activated the device (the device
    /// decides what it can serve). Returns the device's "work left" answer.
    ///
    /// # Example
    /// `let more = transport.lock().unwrap().host_event(0, HostInterest::READABLE);`
    pub fn host_event(&mut self, token: u32, ready: super::HostInterest) -> bool {
        self.device.host_event(token, ready)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.device.device_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.shared.interrupt_status.load(Ordering::SeqCst),
            STATUS => u32::from(self.status()),
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.shared.config_generation.load(Ordering::SeqCst),
            _ => {
                log::debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_reg(offset, value)
            }
            // No ioeventfd caught this write (none registered, or no backend support): serve
            // the queue here on the vCPU thread, to the end.
            QUEUE_NOTIFY_OFFSET => while self.notify_queue(value) {},
            INTERRUPT_ACK => {
                self.shared
                    .interrupt_status
                    .fetch_and(!value, Ordering::SeqCst);
            }
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => log::debug!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status() & STATUS_FEATURES_OK != 0 {
            log::debug!("virtio-mmio: DriverFeatures write after FEATURES_OK ignored");
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => log::debug!("virtio-mmio: DriverFeatures write to window {sel} ignored"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let status = self.status();
        if status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) != STATUS_FEATURES_OK {
            log::debug!(
                "virtio-mmio: queue register {offset:#x} write in status {status:#x} ignored"
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            log::debug!("virtio-mmio: queue register {offset:#x} write for absent queue {sel}");
            return;
        };
        if offset == QUEUE_READY {
            q.ready = value != 0;
            return;
        }
        if q.ready {
            log::debug!("virtio-mmio: queue {sel} register {offset:#x} write while ready ignored");
            return;
        }
        let set_low =
            |a: &mut vm_memory::GuestAddress| a.0 = (a.0 & !0xffff_ffff) | u64::from(value);
        let set_high =
            |a: &mut vm_memory::GuestAddress| a.0 = (a.0 & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(n) if n.is_power_of_two() && n <= q.max_size => q.size = n,
                _ => log::debug!(
                    "virtio-mmio: queue {sel} size {value} is not a power of two <= {}",
                    q.max_size
                ),
            },
            QUEUE_DESC_LOW => set_low(&mut q.desc_table),
            QUEUE_DESC_HIGH => set_high(&mut q.desc_table),
            QUEUE_DRIVER_LOW => set_low(&mut q.avail_ring),
            QUEUE_DRIVER_HIGH => set_high(&mut q.avail_ring),
            QUEUE_DEVICE_LOW => set_low(&mut q.used_ring),
            QUEUE_DEVICE_HIGH => set_high(&mut q.used_ring),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        let Ok(new) = u8::try_from(value) else {
            log::debug!("virtio-mmio: status {value:#x} out of range ignored");
            return;
        };
        if new & STATUS_FAILED != 0 && old & STATUS_FAILED == 0 {
            log::debug!("virtio-mmio: driver set FAILED");
            self.shared.status.fetch_or(STATUS_FAILED, Ordering::SeqCst);
        }
        let old_steps = old & HANDSHAKE_MASK;
        let new_steps = new & HANDSHAKE_MASK;
        if new_steps == old_steps {
            return;
        }
        // The result must keep every bit already set and be a prefix of the handshake order.
        let is_prefix = HANDSHAKE
            .iter()
            .scan(0u8, |acc, &bit| {
                *acc |= bit;
                Some(*acc)
            })
            .any(|prefix| prefix == new_steps);
        if new_steps & old_steps != old_steps || !is_prefix {
            log::debug!("virtio-mmio: status {old:#x} -> {new:#x} out of order, ignored");
            return;
        }
        if old & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) != 0 || new & STATUS_FAILED != 0 {
            log::debug!("virtio-mmio: status {new:#x} after FAILED/NEEDS_RESET ignored");
            return;
        }
        let added = new_steps & !old_steps;
        let mut accepted = added & (STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        if added & STATUS_FEATURES_OK != 0 {
            if !self.features_acceptable() {
                log::debug!(
                    "virtio-mmio: driver features {:#x} refused (device offers {:#x})",
                    self.driver_features,
                    self.device.device_features()
                );
                self.shared.status.fetch_or(accepted, Ordering::SeqCst);
                return;
            }
            accepted |= STATUS_FEATURES_OK;
        }
        self.shared.status.fetch_or(accepted, Ordering::SeqCst);
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let features = self.driver_features;
        let mut queues = self.queues.clone();
        for (i, q) in queues.iter_mut().enumerate() {
            q.indirect = features & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0;
            q.event_idx = features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
            if q.ready && !q.is_valid(&self.mem) {
                log::warn!("virtio-mmio: queue {i} configured invalidly: {q:?}; needs reset");
                self.shared
                    .status
                    .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::SeqCst);
                return;
            }
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.shared.clone();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            features,
            interrupt,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                self.shared
                    .status
                    .fetch_or(STATUS_DRIVER_OK, Ordering::SeqCst);
            }
            Err(e) => {
                log::warn!("virtio-mmio: device activation failed: {e}; needs reset");
                self.shared
                    .status
                    .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::SeqCst);
            }
        }
    }

    /// Device reset (the driver wrote 0 to Status).
    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shared.status.store(0, Ordering::SeqCst);
        self.shared.interrupt_status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 4-byte access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a 4-byte access",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio-mmio: misaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// One device's place in the guest: its register window and interrupt line.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::mmio::MmioSlot;
/// let slot = MmioSlot { addr: 0xd000_0000, len: 0x1000, irq: 5 };
/// assert_eq!(slot.kernel_cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical address of the register window.
    pub addr: u64,
    /// Length of the window in bytes.
    pub len: u64,
    /// The interrupt line (GSI on x86).
    pub irq: u32,
}

impl MmioSlot {
    /// The Linux command-line argument that announces this device to a kernel without a
    /// device tree or ACPI description: `virtio_mmio.device=<size>@<addr>:<irq>` (needs
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). The size takes a `K`/`M`/`G` suffix as Linux's
    /// `memparse` reads it, the address is hexadecimal with `0x`, the IRQ decimal.
    ///
    /// # Example
    /// See [`MmioSlot`].
    pub fn kernel_cmdline_arg(&self) -> String {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
        let size = UNITS
            .iter()
            .find(|&&(unit, _)| self.len >= unit && self.len % unit == 0)
            .map_or_else(
                || self.len.to_string(),
                |&(unit, s)| format!("{}{s}", self.len / unit),
            );
        format!("virtio_mmio.device={size}@{:#x}:{}", self.addr, self.irq)
    }
}

/// Why [`MmioAllocator::allocate`] failed.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::mmio::{MmioAllocError, MmioAllocator};
/// let mut a = MmioAllocator::new(0x1000_0000, 0x1000, 0x1000_1000, 5, 23);
/// a.allocate().unwrap();
/// assert_eq!(a.allocate(), Err(MmioAllocError::AddressesExhausted));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmioAllocError {
    /// Every device interrupt line is taken.
    #[error("no free interrupt line for another virtio-mmio device")]
    IrqsExhausted,
    /// The device address range is full.
    #[error("no free MMIO window for another virtio-mmio device")]
    AddressesExhausted,
}

/// Hands out [`MmioSlot`]s: consecutive windows and consecutive interrupt lines. The one
/// place that decides where virtio-mmio devices live, so the kernel command line (x86) and a
/// device tree (aarch64) can both be generated from [`slots`](Self::slots).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::mmio::MmioAllocator;
/// let mut a = MmioAllocator::x86_64();
/// let first = a.allocate().unwrap();
/// let second = a.allocate().unwrap();
/// assert_eq!((first.addr, first.irq), (0xd000_0000, 5));
/// assert_eq!((second.addr, second.irq), (0xd000_1000, 6));
/// assert_eq!(a.slots(), &[first, second]);
/// ```
#[derive(Debug, Clone)]
pub struct MmioAllocator {
    next_addr: u64,
    window: u64,
    end_addr: u64,
    next_irq: u32,
    last_irq: u32,
    slots: Vec<MmioSlot>,
}

impl MmioAllocator {
    /// Windows of `window` bytes from `start` up to (not including) `end`, interrupt lines
    /// `first_irq..=last_irq`.
    ///
    /// # Example
    /// See [`MmioAllocError`].
    pub fn new(start: u64, window: u64, end: u64, first_irq: u32, last_irq: u32) -> Self {
        MmioAllocator {
            next_addr: start,
            window,
            end_addr: end,
            next_irq: first_irq,
            last_irq,
            slots: Vec::new(),
        }
    }

    /// The x86_64 microVM layout: 4 KiB windows from
    /// [`MMIO_DEVICES_START`](layout::MMIO_DEVICES_START) up to the IOAPIC, GSIs
    /// [`IRQ_DEVICES_START`](layout::IRQ_DEVICES_START)..=[`IRQ_DEVICES_END`](layout::IRQ_DEVICES_END).
    ///
    /// # Example
    /// See [`MmioAllocator`].
    pub fn x86_64() -> Self {
        Self::new(
            layout::MMIO_DEVICES_START,
            MMIO_WINDOW_SIZE,
            layout::IOAPIC_START,
            layout::IRQ_DEVICES_START,
            layout::IRQ_DEVICES_END,
        )
    }

    /// The aarch64 layout: 4 KiB windows from
    /// [`MMIO_DEVICES_START`](crate::arch::aarch64::layout::MMIO_DEVICES_START) to
    /// [`MMIO_DEVICES_END`](crate::arch::aarch64::layout::MMIO_DEVICES_END), and SPIs
    /// [`IRQ_DEVICES_START`](crate::arch::aarch64::layout::IRQ_DEVICES_START)..=[`IRQ_DEVICES_END`](crate::arch::aarch64::layout::IRQ_DEVICES_END).
    /// The `irq` of these slots is the SPI number counted from 0 (GIC INTID − 32): the
    /// number [`Vm::set_irq_line`](crate::hypervisor::Vm::set_irq_line), irqfds and the
    /// device tree's `<GIC_SPI irq flags>` specifier all take.
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::layout;
    /// use smolvm::devices::virtio::mmio::MmioAllocator;
    /// let mut a = MmioAllocator::aarch64();
    /// let slot = a.allocate().unwrap();
    /// assert_eq!((slot.addr, slot.irq), (layout::MMIO_DEVICES_START, layout::IRQ_DEVICES_START));
    /// ```
    pub fn aarch64() -> Self {
        use crate::arch::aarch64::layout as a64;
        Self::new(
            a64::MMIO_DEVICES_START,
            MMIO_WINDOW_SIZE,
            a64::MMIO_DEVICES_END,
            a64::IRQ_DEVICES_START,
            a64::IRQ_DEVICES_END,
        )
    }

    /// The next free slot.
    ///
    /// # Errors
    /// [`MmioAllocError`] when the interrupt lines or the address range run out (nothing is
    /// consumed then).
    ///
    /// # Example
    /// See [`MmioAllocator`].
    pub fn allocate(&mut self) -> Result<MmioSlot, MmioAllocError> {
        if self.next_irq > self.last_irq {
            return Err(MmioAllocError::IrqsExhausted);
        }
        let end = self
            .next_addr
            .checked_add(self.window)
            .filter(|&end| end <= self.end_addr && self.window > 0)
            .ok_or(MmioAllocError::AddressesExhausted)?;
        let slot = MmioSlot {
            addr: self.next_addr,
            len: self.window,
            irq: self.next_irq,
        };
        self.next_addr = end;
        self.next_irq += 1;
        self.slots.push(slot);
        Ok(slot)
    }

    /// Every slot handed out so far, in order.
    ///
    /// # Example
    /// See [`MmioAllocator`].
    pub fn slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// The kernel command-line arguments for every slot handed out, space-separated (x86
    /// guests without a device tree).
    ///
    /// # Example
    /// ```
    /// let mut a = smolvm::devices::virtio::mmio::MmioAllocator::x86_64();
    /// a.allocate().unwrap();
    /// a.allocate().unwrap();
    /// assert_eq!(
    ///     a.kernel_cmdline_args(),
    ///     "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    /// );
    /// ```
    pub fn kernel_cmdline_args(&self) -> String {
        self.slots
            .iter()
            .map(MmioSlot::kernel_cmdline_arg)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::{ActivateError, DEVICE_ID_BLOCK};

    const MEM_SIZE: usize = 0x10000;
    const FEATURE_DEV_SPECIFIC: u64 = 1 << 3;
    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_F_RING_EVENT_IDX)
        | (1 << VIRTIO_F_RING_INDIRECT_DESC)
        | FEATURE_DEV_SPECIFIC;

    #[derive(Default)]
    struct Log {
        activations: Vec<(Vec<Queue>, u64)>,
        notifies: Vec<u16>,
        resets: u32,
        config_writes: Vec<(u64, Vec<u8>)>,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        fail_activate: bool,
        /// How many more notifications answer "work left".
        more_pending: u32,
    }

    /// Two queues (256 and 64 entries), a 16-byte config space whose byte `i` is `i`.
    struct TestDevice(Arc<Mutex<Log>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            DEVICE_ID_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 64]
        }
        fn device_features(&self) -> u64 {
            OFFERED
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = if at < 16 { at as u8 } else { 0 };
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let mut log = self.0.lock().unwrap();
            if log.fail_activate {
                return Err(ActivateError::QueueNotReady(1));
            }
            log.activations.push((ctx.queues, ctx.features));
            log.interrupt = Some(ctx.interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) -> bool {
            let mut log = self.0.lock().unwrap();
            log.notifies.push(queue);
            if log.more_pending > 0 {
                log.more_pending -= 1;
                return true;
            }
            false
        }
        fn reset(&mut self) {
            let mut log = self.0.lock().unwrap();
            log.resets += 1;
            log.interrupt = None;
        }
    }

    struct Fixture {
        t: MmioTransport,
        log: Arc<Mutex<Log>>,
        irqs: Arc<AtomicU32>,
    }

    fn fixture() -> Fixture {
        let log = Arc::new(Mutex::new(Log::default()));
        let irqs = Arc::new(AtomicU32::new(0));
        let i = irqs.clone();
        let mem = crate::memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let t = MmioTransport::with_trigger(
            Box::new(TestDevice(log.clone())),
            mem,
            Arc::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
            }),
        );
        Fixture { t, log, irqs }
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut v = [0xaau8; 4];
        t.read(0xd000_0000, offset, &mut v);
        u32::from_le_bytes(v)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(0xd000_0000, offset, &value.to_le_bytes());
    }

    /// Linux `virtio_add_status`: read, OR, write.
    fn add_status(t: &mut MmioTransport, bits: u8) {
        let s = r(t, STATUS);
        w(t, STATUS, s | u32::from(bits));
    }

    /// Linux's probe up to FEATURES_OK with `features`; returns whether the re-read shows it.
    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        w(t, STATUS, 0);
        add_status(t, STATUS_ACKNOWLEDGE);
        add_status(t, STATUS_DRIVER);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, (features >> 32) as u32);
        w(t, DRIVER_FEATURES_SEL, 0);
        w(t, DRIVER_FEATURES, features as u32);
        add_status(t, STATUS_FEATURES_OK);
        r(t, STATUS) & u32::from(STATUS_FEATURES_OK) != 0
    }

    /// Linux `vm_setup_vq`.
    fn setup_queue(t: &mut MmioTransport, index: u32, num: u32, desc: u64, avail: u64, used: u64) {
        w(t, QUEUE_SEL, index);
        assert_eq!(r(t, QUEUE_READY), 0);
        assert_ne!(r(t, QUEUE_NUM_MAX), 0);
        w(t, QUEUE_NUM, num);
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            w(t, low, addr as u32);
            w(t, low + 4, (addr >> 32) as u32);
        }
        w(t, QUEUE_READY, 1);
        assert_eq!(r(t, QUEUE_READY), 1);
    }

    const NEGOTIATED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX);

    /// Full handshake: both queues set up, DRIVER_OK.
    fn activate(f: &mut Fixture) {
        assert!(negotiate(&mut f.t, NEGOTIATED));
        setup_queue(&mut f.t, 0, 128, 0x1000, 0x2000, 0x3000);
        setup_queue(&mut f.t, 1, 64, 0x4000, 0x5000, 0x6000);
        add_status(&mut f.t, STATUS_DRIVER_OK);
        assert_eq!(f.t.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    }

    #[test]
    fn probe_identity_registers() {
        let mut f = fixture();
        assert_eq!(r(&mut f.t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut f.t, VERSION), 2);
        assert_eq!(r(&mut f.t, DEVICE_ID), DEVICE_ID_BLOCK);
        assert_eq!(r(&mut f.t, VENDOR_ID), 0x4d56_4d53);
        assert_eq!(r(&mut f.t, STATUS), 0);
        assert_eq!(
            r(&mut f.t, SHM_LEN_LOW),
            u32::MAX,
            "no shared memory regions"
        );
    }

    #[test]
    fn feature_negotiation_through_both_windows() {
        let mut f = fixture();
        w(&mut f.t, DEVICE_FEATURES_SEL, 0);
        let low = r(&mut f.t, DEVICE_FEATURES);
        w(&mut f.t, DEVICE_FEATURES_SEL, 1);
        let high = r(&mut f.t, DEVICE_FEATURES);
        assert_eq!((u64::from(high) << 32) | u64::from(low), OFFERED);
        w(&mut f.t, DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut f.t, DEVICE_FEATURES), 0);

        let wanted = NEGOTIATED | FEATURE_DEV_SPECIFIC;
        assert!(negotiate(&mut f.t, wanted));
        assert_eq!(f.t.state().driver_features, wanted);
        let expected = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        assert_eq!(f.t.status(), expected);

        // Window 2 is ignored, and nothing changes once FEATURES_OK is set.
        w(&mut f.t, DRIVER_FEATURES_SEL, 2);
        w(&mut f.t, DRIVER_FEATURES, u32::MAX);
        w(&mut f.t, DRIVER_FEATURES_SEL, 0);
        w(&mut f.t, DRIVER_FEATURES, 0);
        assert_eq!(f.t.state().driver_features, wanted);
    }

    #[test]
    fn features_ok_refused_for_unoffered_features_or_missing_version_1() {
        let mut f = fixture();
        assert!(!negotiate(&mut f.t, NEGOTIATED | (1 << 5)));
        assert_eq!(f.t.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(!negotiate(&mut f.t, 1 << 50 | NEGOTIATED));
        assert!(!negotiate(&mut f.t, 1 << VIRTIO_F_RING_EVENT_IDX));
        assert!(!negotiate(&mut f.t, 0));
        // Linux then sets FAILED: recorded, and no further progress.
        add_status(&mut f.t, STATUS_FAILED);
        assert_eq!(f.t.status() & STATUS_FAILED, STATUS_FAILED);
        w(&mut f.t, DRIVER_FEATURES, NEGOTIATED as u32);
        w(&mut f.t, DRIVER_FEATURES_SEL, 1);
        w(&mut f.t, DRIVER_FEATURES, 1);
        add_status(&mut f.t, STATUS_FEATURES_OK);
        assert_eq!(f.t.status() & STATUS_FEATURES_OK, 0);
        // A reset recovers.
        assert!(negotiate(&mut f.t, NEGOTIATED));
    }

    #[test]
    fn driver_ok_activates_with_configured_queues_and_negotiated_flags() {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, NEGOTIATED));
        // Linux reads config during probe.
        setup_queue(&mut f.t, 0, 128, 0x1000, 0x2000, 0x3000);
        setup_queue(&mut f.t, 1, 64, 0x4000, 0x5000, 0x6000);
        assert!(f.log.lock().unwrap().activations.is_empty());
        add_status(&mut f.t, STATUS_DRIVER_OK);
        assert!(f.t.is_activated());
        assert_eq!(
            r(&mut f.t, STATUS),
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        );
        let log = f.log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        let (queues, features) = &log.activations[0];
        assert_eq!(*features, NEGOTIATED);
        assert_eq!(queues.len(), 2);
        let q0 = &queues[0];
        assert_eq!((q0.max_size, q0.size, q0.ready), (256, 128, true));
        assert_eq!(
            (q0.desc_table, q0.avail_ring, q0.used_ring),
            (
                GuestAddress(0x1000),
                GuestAddress(0x2000),
                GuestAddress(0x3000)
            )
        );
        assert!(q0.event_idx && !q0.indirect);
        let q1 = &queues[1];
        assert_eq!((q1.max_size, q1.size, q1.ready), (64, 64, true));
        assert_eq!(
            (q1.desc_table, q1.avail_ring, q1.used_ring),
            (
                GuestAddress(0x4000),
                GuestAddress(0x5000),
                GuestAddress(0x6000)
            )
        );
        assert!(q1.event_idx && !q1.indirect);
    }

    #[test]
    fn indirect_flag_follows_negotiation_and_unready_queues_are_not_validated() {
        let mut f = fixture();
        let features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_INDIRECT_DESC);
        assert!(negotiate(&mut f.t, features));
        setup_queue(&mut f.t, 0, 256, 0x1000, 0x2000, 0x3000);
        // Queue 1 gets garbage addresses but is never made ready.
        w(&mut f.t, QUEUE_SEL, 1);
        w(&mut f.t, QUEUE_DESC_HIGH, 0xffff_ffff);
        add_status(&mut f.t, STATUS_DRIVER_OK);
        assert!(f.t.is_activated());
        let log = f.log.lock().unwrap();
        let (queues, _) = &log.activations[0];
        assert!(queues[0].indirect && !queues[0].event_idx);
        assert!(!queues[1].ready);
    }

    #[test]
    fn notify_reaches_the_device_only_when_active_and_in_range() {
        let mut f = fixture();
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 0);
        f.t.notify_queue(1);
        assert!(
            f.log.lock().unwrap().notifies.is_empty(),
            "before DRIVER_OK"
        );
        activate(&mut f);
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 1);
        f.t.notify_queue(0);
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 99);
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 0x1_0000);
        assert!(!f.t.notify_queue(2));
        assert!(!f.t.notify_queue(u32::MAX));
        assert_eq!(f.log.lock().unwrap().notifies, vec![1, 0]);
        assert_eq!(r(&mut f.t, QUEUE_NOTIFY_OFFSET), 0, "write-only");
    }

    #[test]
    fn notify_reports_work_left_and_the_register_path_loops_until_done() {
        let mut f = fixture();
        activate(&mut f);
        f.log.lock().unwrap().more_pending = 1;
        assert!(f.t.notify_queue(0), "device stopped early");
        assert!(!f.t.notify_queue(0));
        // A QueueNotify write (no ioeventfd) calls the device until it reports no work left.
        f.log.lock().unwrap().notifies.clear();
        f.log.lock().unwrap().more_pending = 3;
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(f.log.lock().unwrap().notifies, vec![1, 1, 1, 1]);
    }

    #[test]
    fn device_interrupts_set_status_trigger_the_line_and_are_acked() {
        let mut f = fixture();
        activate(&mut f);
        let irq = f.log.lock().unwrap().interrupt.clone().unwrap();
        let gen0 = r(&mut f.t, CONFIG_GENERATION);

        irq.signal_used_queue(0);
        assert_eq!(r(&mut f.t, INTERRUPT_STATUS), INTERRUPT_USED_RING);
        assert_eq!(f.irqs.load(Ordering::SeqCst), 1);
        irq.signal_config_change();
        assert_eq!(r(&mut f.t, INTERRUPT_STATUS), 3);
        assert_eq!(f.irqs.load(Ordering::SeqCst), 2);
        assert_eq!(r(&mut f.t, CONFIG_GENERATION), gen0 + 1);

        // Linux vm_interrupt: read status, ack what it saw.
        w(&mut f.t, INTERRUPT_ACK, INTERRUPT_USED_RING);
        assert_eq!(r(&mut f.t, INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        w(&mut f.t, INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(r(&mut f.t, INTERRUPT_STATUS), 0);
        assert_eq!(r(&mut f.t, INTERRUPT_ACK), 0, "write-only");

        irq.set_needs_reset();
        assert_ne!(
            r(&mut f.t, STATUS) & u32::from(STATUS_DEVICE_NEEDS_RESET),
            0
        );
        assert_eq!(r(&mut f.t, INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(r(&mut f.t, CONFIG_GENERATION), gen0 + 2);
        assert_eq!(f.irqs.load(Ordering::SeqCst), 3);
        // Reading Status with NEEDS_RESET and writing it back (virtio_add_status) is harmless.
        add_status(&mut f.t, STATUS_DRIVER_OK);
        assert!(f.t.is_activated());
    }

    #[test]
    fn needs_reset_only_after_driver_ok() {
        let f = fixture();
        f.t.shared.set_needs_reset();
        assert_eq!(f.t.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(f.t.state().interrupt_status, INTERRUPT_CONFIG_CHANGE);
    }

    #[test]
    fn config_space_is_forwarded_with_offsets_and_any_size() {
        let mut f = fixture();
        assert_eq!(
            r(&mut f.t, CONFIG_SPACE_OFFSET + 4),
            u32::from_le_bytes([4, 5, 6, 7])
        );
        let mut b = [0u8; 1];
        f.t.read(0, CONFIG_SPACE_OFFSET + 15, &mut b);
        assert_eq!(b, [15]);
        let mut q = [0u8; 8];
        f.t.read(0, CONFIG_SPACE_OFFSET + 8, &mut q);
        assert_eq!(q, [8, 9, 10, 11, 12, 13, 14, 15]);
        let mut h = [0xffu8; 2];
        f.t.read(0, CONFIG_SPACE_OFFSET + 3, &mut h);
        assert_eq!(h, [3, 4], "unaligned config reads are fine");
        f.t.read(0, 0xfff, &mut b);
        assert_eq!(b, [0]);
        f.t.write(0, CONFIG_SPACE_OFFSET + 2, &[0xab, 0xcd]);
        assert_eq!(
            f.log.lock().unwrap().config_writes,
            vec![(2, vec![0xab, 0xcd])]
        );
        assert_eq!(r(&mut f.t, CONFIG_GENERATION), 0);
        w(&mut f.t, CONFIG_GENERATION, 7);
        assert_eq!(r(&mut f.t, CONFIG_GENERATION), 0, "read-only");
    }

    #[test]
    fn writing_zero_to_status_resets_everything() {
        let mut f = fixture();
        activate(&mut f);
        let irq = f.log.lock().unwrap().interrupt.clone().unwrap();
        irq.signal_config_change();
        irq.signal_used_queue(1);
        w(&mut f.t, DEVICE_FEATURES_SEL, 1);
        w(&mut f.t, QUEUE_SEL, 1);
        let resets_before = f.log.lock().unwrap().resets;

        w(&mut f.t, STATUS, 0);
        assert_eq!(f.log.lock().unwrap().resets, resets_before + 1);
        let s = f.t.state();
        let fresh = fixture().t.state();
        assert_eq!(s.config_generation, 1, "kept across reset");
        assert_eq!(
            MmioTransportState {
                config_generation: 0,
                ..s
            },
            fresh
        );
        assert!(!f.t.is_activated());
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(f.log.lock().unwrap().notifies.is_empty());
        // And the device can be brought up again.
        activate(&mut f);
        assert_eq!(f.log.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn hostile_register_accesses_are_ignored() {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, NEGOTIATED));
        let before = f.t.state();
        let mut buf = [0xaau8; 8];
        for (offset, len) in [
            (0x002, 4),
            (0x000, 2),
            (0x000, 1),
            (0x000, 8),
            (0x070, 2),
            (0x071, 1),
        ] {
            let data = &mut buf[..len];
            data.fill(0xaa);
            f.t.read(0, offset, data);
            assert!(
                data.iter().all(|&b| b == 0),
                "{len}-byte read at {offset:#x}"
            );
        }
        // Unknown offsets inside the register block.
        for offset in [0x018, 0x040, 0x0c0, 0x0f8] {
            assert_eq!(r(&mut f.t, offset), 0, "{offset:#x}");
        }
        // Reads of write-only registers.
        for offset in [
            QUEUE_NUM,
            QUEUE_DESC_LOW,
            QUEUE_DEVICE_HIGH,
            DRIVER_FEATURES,
            QUEUE_SEL,
        ] {
            assert_eq!(r(&mut f.t, offset), 0, "{offset:#x}");
        }
        // Short, long and misaligned writes; writes of read-only and unknown registers.
        f.t.write(0, STATUS, &[0]);
        f.t.write(0, STATUS, &[0, 0]);
        f.t.write(0, STATUS, &[0; 8]);
        f.t.write(0, STATUS + 1, &[0; 4]);
        f.t.write(0, QUEUE_SEL + 2, &1u32.to_le_bytes());
        for offset in [
            MAGIC_VALUE,
            VERSION,
            DEVICE_ID,
            VENDOR_ID,
            DEVICE_FEATURES,
            QUEUE_NUM_MAX,
        ] {
            w(&mut f.t, offset, 0x1234);
        }
        w(&mut f.t, INTERRUPT_STATUS, 3);
        w(&mut f.t, 0x0f8, 0);
        w(&mut f.t, SHM_SEL, 0);
        assert_eq!(f.t.state(), before);
        assert_eq!(f.log.lock().unwrap().resets, 1, "only negotiate()'s reset");
        assert_eq!(r(&mut f.t, MAGIC_VALUE), MMIO_MAGIC);
    }

    #[test]
    fn queue_num_must_be_a_power_of_two_within_max() {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, NEGOTIATED));
        w(&mut f.t, QUEUE_SEL, 1); // max 64
        for bad in [0, 3, 100, 128, 0x1_0040, u32::MAX] {
            w(&mut f.t, QUEUE_NUM, bad);
            assert_eq!(f.t.state().queues[1].size, 64, "size {bad}");
        }
        w(&mut f.t, QUEUE_NUM, 1);
        assert_eq!(f.t.state().queues[1].size, 1);
        w(&mut f.t, QUEUE_NUM, 32);
        assert_eq!(f.t.state().queues[1].size, 32);
    }

    #[test]
    fn queue_config_only_between_features_ok_and_driver_ok() {
        let mut f = fixture();
        // Before FEATURES_OK.
        w(&mut f.t, STATUS, 0);
        add_status(&mut f.t, STATUS_ACKNOWLEDGE);
        add_status(&mut f.t, STATUS_DRIVER);
        w(&mut f.t, QUEUE_SEL, 0);
        w(&mut f.t, QUEUE_NUM, 16);
        w(&mut f.t, QUEUE_DESC_LOW, 0x1000);
        w(&mut f.t, QUEUE_READY, 1);
        assert_eq!(f.t.state().queues[0], Queue::new(256));

        // Both halves of each address land in the right place.
        assert!(negotiate(&mut f.t, NEGOTIATED));
        w(&mut f.t, QUEUE_SEL, 1);
        for (i, low) in [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW]
            .into_iter()
            .enumerate()
        {
            w(&mut f.t, low, 0x1000 * (i as u32 + 1));
            w(&mut f.t, low + 4, i as u32 + 0x10);
        }
        let q = &f.t.state().queues[1];
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (
                GuestAddress(0x10_0000_1000),
                GuestAddress(0x11_0000_2000),
                GuestAddress(0x12_0000_3000)
            )
        );

        // While ready: size and addresses locked, ready can be cleared.
        setup_queue(&mut f.t, 0, 128, 0x1000, 0x2000, 0x3000);
        w(&mut f.t, QUEUE_NUM, 16);
        w(&mut f.t, QUEUE_DESC_LOW, 0x8000);
        w(&mut f.t, QUEUE_DEVICE_HIGH, 1);
        let q = &f.t.state().queues[0];
        assert_eq!(
            (q.size, q.desc_table, q.used_ring),
            (128, GuestAddress(0x1000), GuestAddress(0x3000))
        );
        w(&mut f.t, QUEUE_READY, 0);
        assert_eq!(r(&mut f.t, QUEUE_READY), 0);
        setup_queue(&mut f.t, 0, 128, 0x1000, 0x2000, 0x3000);

        // After DRIVER_OK: nothing changes.
        add_status(&mut f.t, STATUS_DRIVER_OK);
        let before = f.t.state();
        w(&mut f.t, QUEUE_READY, 0);
        w(&mut f.t, QUEUE_SEL, 1);
        w(&mut f.t, QUEUE_NUM, 16);
        w(&mut f.t, QUEUE_DESC_LOW, 0x7000);
        w(&mut f.t, QUEUE_READY, 1);
        assert_eq!(f.t.state().queues, before.queues);
    }

    #[test]
    fn queue_sel_out_of_range() {
        let mut f = fixture();
        assert!(negotiate(&mut f.t, NEGOTIATED));
        let before = f.t.state().queues;
        for sel in [2, 99, u32::MAX] {
            w(&mut f.t, QUEUE_SEL, sel);
            assert_eq!(r(&mut f.t, QUEUE_NUM_MAX), 0);
            assert_eq!(r(&mut f.t, QUEUE_READY), 0);
            w(&mut f.t, QUEUE_NUM, 16);
            w(&mut f.t, QUEUE_DESC_LOW, 0x1000);
            w(&mut f.t, QUEUE_READY, 1);
        }
        assert_eq!(f.t.state().queues, before);
        w(&mut f.t, QUEUE_SEL, 1);
        assert_eq!(r(&mut f.t, QUEUE_NUM_MAX), 64);
    }

    #[test]
    fn invalid_rings_at_driver_ok_set_needs_reset() {
        let cases: [(u64, u64, u64); 4] = [
            (MEM_SIZE as u64, 0x2000, 0x3000), // descriptor table outside memory
            (0x1000, 0x2000, MEM_SIZE as u64 - 8), // used ring runs past the end
            (0x1008, 0x2000, 0x3000),          // descriptor table misaligned
            (0x1000, 0xffff_ffff_ffff_fff0, 0x3000), // avail ring overflows
        ];
        for (desc, avail, used) in cases {
            let mut f = fixture();
            assert!(negotiate(&mut f.t, NEGOTIATED));
            setup_queue(&mut f.t, 0, 256, desc, avail, used);
            add_status(&mut f.t, STATUS_DRIVER_OK);
            let s = f.t.status();
            assert_eq!(s & STATUS_DRIVER_OK, 0, "{desc:#x} {avail:#x} {used:#x}");
            assert_ne!(s & STATUS_DEVICE_NEEDS_RESET, 0);
            assert!(f.log.lock().unwrap().activations.is_empty());
            assert!(!f.t.is_activated());
            // Retrying DRIVER_OK does not activate; notifications are ignored.
            add_status(&mut f.t, STATUS_DRIVER_OK);
            w(&mut f.t, QUEUE_NOTIFY_OFFSET, 0);
            assert!(f.log.lock().unwrap().activations.is_empty());
            assert!(f.log.lock().unwrap().notifies.is_empty());
            // A reset clears NEEDS_RESET and a correct setup works.
            activate(&mut f);
        }
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let mut f = fixture();
        f.log.lock().unwrap().fail_activate = true;
        assert!(negotiate(&mut f.t, NEGOTIATED));
        add_status(&mut f.t, STATUS_DRIVER_OK);
        assert_eq!(
            f.t.status() & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET),
            STATUS_DEVICE_NEEDS_RESET
        );
        assert!(!f.t.is_activated());
    }

    #[test]
    fn status_bits_must_be_set_in_order() {
        let mut f = fixture();
        let a = u32::from(STATUS_ACKNOWLEDGE);
        let d = u32::from(STATUS_DRIVER);
        let fo = u32::from(STATUS_FEATURES_OK);
        let ok = u32::from(STATUS_DRIVER_OK);
        w(&mut f.t, STATUS, d);
        assert_eq!(f.t.status(), 0, "DRIVER before ACKNOWLEDGE");
        w(&mut f.t, STATUS, a | ok);
        assert_eq!(f.t.status(), 0, "DRIVER_OK skipping steps");
        w(&mut f.t, STATUS, 0x100 | a);
        assert_eq!(f.t.status(), 0, "value above 8 bits");
        w(&mut f.t, STATUS, a);
        w(&mut f.t, STATUS, a | d | ok);
        assert_eq!(
            f.t.status(),
            STATUS_ACKNOWLEDGE,
            "DRIVER_OK before FEATURES_OK"
        );
        // Several steps at once are fine when in order.
        w(&mut f.t, DRIVER_FEATURES_SEL, 1);
        w(&mut f.t, DRIVER_FEATURES, 1);
        w(&mut f.t, STATUS, a | d | fo);
        assert_eq!(u32::from(f.t.status()), a | d | fo);
        // Clearing a bit is not a way back.
        w(&mut f.t, STATUS, a | d);
        w(&mut f.t, STATUS, d | fo | ok);
        assert_eq!(u32::from(f.t.status()), a | d | fo);
        assert!(f.log.lock().unwrap().activations.is_empty());
        // Device-owned NEEDS_RESET cannot be set by the driver.
        w(
            &mut f.t,
            STATUS,
            a | d | fo | u32::from(STATUS_DEVICE_NEEDS_RESET),
        );
        assert_eq!(u32::from(f.t.status()), a | d | fo);
        w(&mut f.t, STATUS, a | d | fo | ok);
        assert!(
            f.t.is_activated(),
            "no queue ready is the device's business"
        );
    }

    #[test]
    fn allocator_hands_out_sequential_slots_until_exhausted() {
        let mut a = MmioAllocator::x86_64();
        let n = (layout::IRQ_DEVICES_END - layout::IRQ_DEVICES_START + 1) as u64;
        for i in 0..n {
            let s = a.allocate().unwrap();
            assert_eq!(
                s,
                MmioSlot {
                    addr: layout::MMIO_DEVICES_START + i * 0x1000,
                    len: 0x1000,
                    irq: layout::IRQ_DEVICES_START + i as u32,
                }
            );
        }
        assert_eq!(a.allocate(), Err(MmioAllocError::IrqsExhausted));
        assert_eq!(a.slots().len() as u64, n);
        assert!(a.slots().last().unwrap().addr + 0x1000 <= layout::IOAPIC_START);

        let mut small = MmioAllocator::new(0x1000, 0x1000, 0x3000, 1, 100);
        assert_eq!(small.allocate().unwrap().addr, 0x1000);
        assert_eq!(small.allocate().unwrap().addr, 0x2000);
        assert_eq!(small.allocate(), Err(MmioAllocError::AddressesExhausted));
        let mut wrap = MmioAllocator::new(u64::MAX - 0xfff, 0x1000, u64::MAX, 1, 2);
        assert_eq!(wrap.allocate(), Err(MmioAllocError::AddressesExhausted));
        let mut empty = MmioAllocator::new(0, 0, u64::MAX, 1, 2);
        assert_eq!(empty.allocate(), Err(MmioAllocError::AddressesExhausted));
    }

    #[test]
    fn aarch64_allocator_uses_spis_clear_of_the_uart_and_gic() {
        use crate::arch::aarch64::layout as a64;
        let mut a = MmioAllocator::aarch64();
        let n = a64::IRQ_DEVICES_END - a64::IRQ_DEVICES_START + 1;
        for i in 0..n {
            let s = a.allocate().unwrap();
            assert_eq!(s.addr, a64::MMIO_DEVICES_START + u64::from(i) * 0x1000);
            assert_eq!(s.irq, a64::IRQ_DEVICES_START + i);
            assert_ne!(s.irq, a64::UART_SPI);
            assert!(
                s.irq + a64::GIC_SPI_BASE < a64::GIC_NR_IRQS,
                "inside NR_IRQS"
            );
            assert!(s.addr + s.len <= a64::MMIO_DEVICES_END);
            let overlaps = |start: u64, len: u64| s.addr < start + len && start < s.addr + s.len;
            assert!(!overlaps(a64::UART_START, a64::UART_SIZE));
            assert!(!overlaps(a64::GIC_DIST_START, a64::GIC_DIST_SIZE));
            assert!(!overlaps(
                a64::GIC_REDIST_START,
                a64::GIC_REDIST_END - a64::GIC_REDIST_START
            ));
            assert!(s.addr + s.len <= a64::RAM_START);
        }
        assert_eq!(a.allocate(), Err(MmioAllocError::IrqsExhausted));
    }

    #[test]
    fn kernel_cmdline_format() {
        let slot = |addr, len, irq| MmioSlot { addr, len, irq };
        assert_eq!(
            slot(0xd000_0000, 0x1000, 5).kernel_cmdline_arg(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            slot(0xd000_1000, 0x10_0000, 23).kernel_cmdline_arg(),
            "virtio_mmio.device=1M@0xd0001000:23"
        );
        assert_eq!(
            slot(0x1_0000_0000, 0x200, 12).kernel_cmdline_arg(),
            "virtio_mmio.device=512@0x100000000:12"
        );
        assert_eq!(
            slot(0, 2 << 30, 5).kernel_cmdline_arg(),
            "virtio_mmio.device=2G@0x0:5"
        );
        assert_eq!(
            slot(0, 0x1800, 5).kernel_cmdline_arg(),
            "virtio_mmio.device=6K@0x0:5"
        );
        let mut a = MmioAllocator::x86_64();
        assert_eq!(a.kernel_cmdline_args(), "");
        a.allocate().unwrap();
        assert_eq!(
            a.kernel_cmdline_args(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}

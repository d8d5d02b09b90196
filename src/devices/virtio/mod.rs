//! Virtio devices, hand-written: the guest's standard paravirtual I/O interface.
//!
//! A virtio device is a set of *virtqueues* in guest memory plus a small configuration
//! interface (feature bits, device status, per-queue addresses, device-specific config) that
//! a *transport* exposes to the driver. smolvm implements the virtio 1.2 specification
//! (modern devices only: [`VIRTIO_F_VERSION_1`] is always offered and required) without the
//! rust-vmm `virtio-queue` / `virtio-device` crates, so every byte the guest controls is
//! parsed by code in this module tree.
//!
//! Layout:
//!
//! - [`queue`]: the split virtqueue (descriptor table, available ring, used ring), with
//!   descriptor-chain validation, byte copies in and out of chains, and notification
//!   suppression (`VIRTIO_F_RING_EVENT_IDX`). Guest memory is untrusted: every ring and
//!   descriptor field is bounds-checked and malformed chains become a [`queue::QueueError`].
//! - [`device`]: the contract between a transport and a device type ([`VirtioDevice`],
//!   [`VirtioInterrupt`]).
//! - [`block`]: virtio-blk and its disk backends (read-write, read-only, copy-on-write
//!   overlays).
//! - [`mmio`]: the virtio-mmio transport (register window, interrupt status, queue
//!   notifications) and the allocator of device windows and interrupt lines.
//! - [`net`]: virtio-net over a TAP device (or any backend), with offloads, mergeable receive
//!   buffers and per-direction rate limits.
//! - `vsock` (Linux hosts): virtio-vsock stream sockets bridged to host Unix sockets
//!   (Firecracker-compatible `CONNECT <port>` protocol) and to an in-process API.
//!
//! The constants below are the transport-independent parts of the specification: reserved
//! feature bits (section 6), device status bits (section 2.1) and device IDs (section 5).
//! Feature constants are *bit numbers*; the feature mask is `1 << bit`.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};
//! let offered: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX);
//! assert_eq!(offered, 0x1_2000_0000);
//! ```

pub mod block;
pub mod device;
pub mod mmio;
pub mod net;
pub mod queue;
// Linux only: the host side multiplexes sockets with epoll and eventfd.
#[cfg(target_os = "linux")]
pub mod vsock;

pub use device::{
    ActivateContext, ActivateError, HostEvent, HostInterest, VirtioDevice, VirtioInterrupt,
};
pub use mmio::{MmioAllocator, MmioSlot, MmioTransport};
pub use queue::{Descriptor, DescriptorChain, Queue, QueueError};

/// Feature bit 24 (legacy only): the device notifies when the available ring runs empty even
/// with notifications suppressed. Never offered by a modern device; listed so it is not reused.
pub const VIRTIO_F_NOTIFY_ON_EMPTY: u32 = 24;

/// Feature bit 27 (legacy only): the device accepts arbitrary descriptor layouts. Implied by
/// [`VIRTIO_F_VERSION_1`]; listed so it is not reused.
pub const VIRTIO_F_ANY_LAYOUT: u32 = 27;

/// Feature bit 28: the driver may use indirect descriptor tables (`VIRTQ_DESC_F_INDIRECT`).
/// When negotiated, set [`Queue::indirect`] on every queue.
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;

/// Feature bit 29: `used_event` / `avail_event` notification suppression. When negotiated, set
/// [`Queue::event_idx`] on every queue.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;

/// Feature bit 32: a virtio 1.x ("modern") device. smolvm offers it always and refuses a driver
/// that does not accept it (FEATURES_OK stays clear).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Feature bit 33: the device's memory accesses go through a platform IOMMU / translation. Not
/// offered by smolvm: guest addresses in rings are guest-physical.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// Feature bit 34: packed virtqueue layout. Not offered: smolvm implements split queues only.
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// Feature bit 35: the device uses buffers in the order the driver made them available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

/// Feature bit 36: memory accesses need platform-specific ordering (real hardware devices).
pub const VIRTIO_F_ORDER_PLATFORM: u32 = 36;

/// Feature bit 37: single-root I/O virtualization (PCI only).
pub const VIRTIO_F_SR_IOV: u32 = 37;

/// Feature bit 38: the driver passes extra data (queue position) with each notification.
pub const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;

/// Feature bit 39: the driver passes a device-provided value with notifications.
pub const VIRTIO_F_NOTIF_CONFIG_DATA: u32 = 39;

/// Feature bit 40: individual queues can be reset.
pub const VIRTIO_F_RING_RESET: u32 = 40;

/// Device status bit: the guest found the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status bit: the guest has a driver for the device.
pub const STATUS_DRIVER: u8 = 2;
/// Device status bit: the driver is set up and the device is live.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status bit: the driver accepted the negotiated features.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status bit: the device hit an unrecoverable error (for example a
/// [`QueueError::AvailIndexJump`]) and needs a reset by the driver.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
/// Device status bit: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 128;

/// Device ID of a network card (virtio-net).
pub const DEVICE_ID_NET: u32 = 1;
/// Device ID of a block device (virtio-blk).
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device ID of a console (virtio-console).
pub const DEVICE_ID_CONSOLE: u32 = 3;
/// Device ID of an entropy source (virtio-rng).
pub const DEVICE_ID_RNG: u32 = 4;
/// Device ID of a socket device (virtio-vsock).
pub const DEVICE_ID_VSOCK: u32 = 19;

//! virtio-net (virtio 1.2, section 5.1): a network card for the guest, backed on the host by a
//! TAP device (or any [`NetBackend`]).
//!
//! # What the device does
//!
//! Two queues: **receive** (queue 0, [`RX_QUEUE`]) holds empty buffers the driver posts; the
//! device fills them with frames read from the backend. **Transmit** (queue 1, [`TX_QUEUE`])
//! holds frames the guest sends; the device writes them to the backend and returns the buffers.
//! Every frame, both ways, starts with the 12-byte `virtio_net_hdr_v1` ([`VNET_HDR_LEN`]):
//! checksum and segmentation-offload metadata that a TAP opened with `IFF_VNET_HDR` speaks
//! natively, so the device passes it through instead of translating.
//!
//! # Features
//!
//! | feature | offered | why |
//! |---|---|---|
//! | `VIRTIO_NET_F_MAC` | yes | a stable address the host side can know; random locally administered unicast unless [`NetConfig::mac`] sets one |
//! | `VIRTIO_NET_F_STATUS` | yes | the link is reported up (`VIRTIO_NET_S_LINK_UP`) |
//! | `VIRTIO_NET_F_MRG_RXBUF` | yes | the guest posts page-sized receive buffers and a large frame spans several: no 64 KiB buffers per slot |
//! | `VIRTIO_NET_F_CSUM`, `GUEST_CSUM` | yes | partial checksums travel unfinished both ways; the TAP (or the final receiver) completes them |
//! | `HOST_TSO4/6`, `HOST_UFO` | yes | the guest hands over up to 64 KiB segments; the TAP accepts them as GSO packets, so nothing segments on the way out of the guest |
//! | `GUEST_TSO4/6`, `GUEST_UFO` | yes | negotiated with the TAP (`TUNSETOFFLOAD`) so the host hands large segments to the guest unsegmented |
//! | `HOST_ECN`, `GUEST_ECN`, `CTRL_VQ`, `MQ`, `MTU` | no | no control queue and one queue pair keep the device small; the MTU is the guest's business |
//! | `VIRTIO_F_RING_EVENT_IDX`, `RING_INDIRECT_DESC` | yes | fewer notifications and interrupts; Linux uses indirect tables for transmit |
//!
//! Configuration space: `mac[6]`, `status: u16` (LINK_UP), `max_virtqueue_pairs: u16` (1).
//!
//! # Back-pressure, not drops
//!
//! The TAP is watched edge-triggered. The device reads frames until the TAP is empty
//! (`EAGAIN`) or the guest runs out of receive buffers; in the second case the frame already
//! read waits in the device's one preallocated buffer ([`RX_BUFFER_LEN`] bytes) and the TAP's
//! kernel queue holds the rest (the kernel drops there, with its own counters, when the guest
//! never catches up). When the driver posts buffers (a receive-queue notification) the device
//! resumes. No host-side queue grows; no loop spins while the guest posts nothing. One call
//! moves at most [`MAX_FRAMES_PER_CALL`] frames per direction and returns `true` when it
//! stopped with work left, as [`VirtioDevice`](super::VirtioDevice) asks.
//!
//! # Rate limiting
//!
//! Each direction has an optional [`RateLimit`](crate::devices::rate_limiter::RateLimit)
//! (bytes/s and packets/s with bursts; unlimited by default). A throttled direction stops
//! (transmit chains stay in the ring, the received frame stays in the buffer) and its
//! limiter's timerfd, one of the device's [host events](super::HostEvent), wakes it.
//!
//! # Hostile guests
//!
//! A transmit chain with a short header, a frame shorter than an Ethernet header, longer than
//! [`MAX_FRAME_LEN`] or a header that asks for offloads the driver did not negotiate (or that
//! do not exist) is dropped, counted in [`NetStats`] and returned with used length 0. Chain
//! errors follow the [block device's rules](super::block::device#queue-handling); a broken ring
//! makes the device report DEVICE_NEEDS_RESET. Nothing the guest writes can make the device
//! panic, allocate per frame or loop without bound.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::net::{MemBackend, Net, NetConfig};
//! use smolvm::devices::virtio::{VirtioDevice, DEVICE_ID_NET};
//!
//! let net = Net::new(MemBackend::default(), NetConfig { mac: Some([2, 0, 0, 0, 0, 1]), ..Default::default() })?;
//! assert_eq!(net.device_type(), DEVICE_ID_NET);
//! let mut mac = [0u8; 6];
//! net.read_config(0, &mut mac);
//! assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
//! # Ok::<(), smolvm::devices::virtio::net::NetError>(())
//! ```

mod backend;
mod device;
#[cfg(target_os = "linux")]
mod tap;

pub use backend::{MemBackend, NetBackend, TxFrame};
pub use device::{
    Net, NetConfig, NetStats, NetStatsHandle, MAX_FRAMES_PER_CALL, MAX_FRAME_LEN, MIN_FRAME_LEN,
    QUEUE_SIZE, RX_BUFFER_LEN, RX_QUEUE, TOKEN_BACKEND, TOKEN_RX_LIMITER, TOKEN_TX_LIMITER,
    TX_QUEUE,
};
#[cfg(target_os = "linux")]
pub use tap::{Tap, TapConfig};

/// Bytes of `struct virtio_net_hdr_v1` in front of every frame (both directions): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;

/// Feature bit 0: the device accepts frames with partial checksums (`NEEDS_CSUM`).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature bit 1: the driver accepts frames with partial checksums.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature bit 5: the configuration space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature bit 7: the driver accepts TCPv4 segmentation offload frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Feature bit 8: the driver accepts TCPv6 segmentation offload frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature bit 10: the driver accepts UDP fragmentation offload frames.
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
/// Feature bit 11: the device accepts TCPv4 segmentation offload frames.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature bit 12: the device accepts TCPv6 segmentation offload frames.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature bit 14: the device accepts UDP fragmentation offload frames.
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
/// Feature bit 15: the driver can merge receive buffers (`num_buffers` in the header).
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Feature bit 16: the configuration space holds a link status.
pub const VIRTIO_NET_F_STATUS: u32 = 16;

/// `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Header flag: the checksum at `csum_start + csum_offset` is partial and must be completed.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag (receive only): the checksum was already validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// Header gso_type: not a segmentation-offload frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// Header gso_type: TCPv4 segmentation offload.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// Header gso_type: UDP fragmentation offload.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// Header gso_type: TCPv6 segmentation offload.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// Header gso_type bit: TCP with ECN (needs `HOST_ECN`, which is not offered).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Errors creating a network device or its TAP backend. Each message says what to do.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::NetError;
/// let e = NetError::InvalidName { name: "a/b".into() };
/// assert!(e.to_string().contains("1-15 bytes"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The kernel refused an operation that needs `CAP_NET_ADMIN`.
    #[error("{op}: needs CAP_NET_ADMIN (run as root or grant the capability, e.g. `setcap cap_net_admin+ep <binary>`): {source}")]
    PermissionDenied {
        /// What was attempted.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {source}; load the tun module (`modprobe tun`) or create the node (`mknod /dev/net/tun c 10 200`)")]
    TunUnavailable {
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// An interface name the kernel cannot take.
    #[error("invalid interface name {name:?}: use 1-15 bytes without '/', whitespace or NUL")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// An IPv4 prefix length above 32.
    #[error("invalid IPv4 prefix length /{0}: use 0-32")]
    InvalidPrefix(u8),
    /// A queue size that is not a power of two in 2..=32768.
    #[error("invalid queue size {0}: use a power of two between 2 and 32768")]
    InvalidQueueSize(u16),
    /// Configuring the interface failed.
    #[error("interface {name}: {op} failed: {source}")]
    Ioctl {
        /// The interface (as requested when it has no kernel name yet).
        name: String,
        /// The operation, with a hint where one helps.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A rate limiter's timer could not be created (out of file descriptors?).
    #[error("cannot create a rate-limiter timer: {0}; check the open-file limit (`ulimit -n`)")]
    Timer(#[source] std::io::Error),
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

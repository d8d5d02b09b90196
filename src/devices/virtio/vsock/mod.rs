//! virtio-vsock (virtio 1.2, section 5.10): stream sockets between the guest and host
//! programs, bridged to host Unix sockets and to an in-process API.
//!
//! - [`packet`]: the 44-byte packet header, parsing, encoding and validation.
//! - [`device`]: the virtio device ([`Vsock`]: device type 19, queues rx = 0, tx = 1,
//!   event = 2, configuration space = `guest_cid: u64`).
//! - `connection`: one connection's state, credit accounting and bounded buffer.
//! - `muxer`: the host side — connection table, Unix sockets, one internal epoll.
//! - [`host`]: the in-process API ([`VsockHost`], [`VsockListener`]).
//!
//! Linux only: the muxer is built on epoll and eventfd.
//!
//! # Packets
//!
//! Every packet is a [`PacketHeader`] (`src_cid`, `dst_cid`, ports, `len`, `type`, `op`,
//! `flags`, `buf_alloc`, `fwd_cnt`) followed by `len` payload bytes (RW only). The guest puts
//! packets in the tx queue (header and payload readable, in one or more descriptors) and
//! posts empty buffers in the rx queue, which the device fills with a header and up to the
//! buffer's size of payload. The event queue is accepted but unused (it only carries
//! TRANSPORT_RESET, for migration).
//!
//! Guest packets must come from the configured guest CID and go to the host (CID 2); others
//! are dropped (the guest cannot spoof). A packet whose type is not STREAM is answered RST;
//! unknown operations and chains too short for their header or declared `len` are dropped
//! (and the connection, if any, reset); payloads are at most [`MAX_PKT_PAYLOAD`].
//!
//! # Connections
//!
//! A connection is `(host port, guest port)`.
//!
//! - Guest → host: REQUEST → the device connects the host side (an in-process listener, else
//!   the Unix socket `<uds_path>_<port>`) and answers RESPONSE, or RST if that fails.
//! - Host → guest: a Unix client of `uds_path` sends `CONNECT <port>\n` (or
//!   [`VsockHost::connect`] is called); the device sends REQUEST from a fresh host port
//!   (from 2^30 up); the guest's RESPONSE makes it `OK <host_port>\n` on the client socket
//!   (the Firecracker-compatible "hybrid" protocol), its RST closes the client.
//! - Data: RW both ways, under credit (below).
//! - SHUTDOWN: flags are sticky. The guest's SEND flag becomes `shutdown(Write)` on the Unix
//!   stream once its buffered data is written; end-of-file on the Unix stream becomes
//!   SHUTDOWN(SEND) to the guest, a Unix peer that cannot take data any more
//!   SHUTDOWN(RECEIVE). Once the guest sent both flags the device answers RST and closes the
//!   Unix stream (clean disconnect); after the device sent both, it waits for the guest's RST.
//! - RST from the guest closes the Unix stream at once; packets for unknown connections (other
//!   than RST) are answered RST.
//! - CREDIT_REQUEST is answered CREDIT_UPDATE; every packet updates the peer's credit.
//! - Device reset closes every connection and Unix stream.
//!
//! # Credit and limits
//!
//! The device advertises `buf_alloc` = [`BUF_ALLOC`] (256 KiB) per connection. Guest data is
//! written straight to the Unix stream; what a slow peer does not take is buffered, never more
//! than `BUF_ALLOC` (a guest exceeding its credit is reset), and `fwd_cnt` only advances as the
//! peer takes data, so a slow peer throttles the guest. A CREDIT_UPDATE goes out when a quarter
//! of the buffer was freed since the guest last heard. Host → guest, the device reads a Unix
//! stream only when the guest has credit and an rx buffer is posted, so nothing is buffered
//! in that direction.
//!
//! Everything else is bounded too, so a hostile guest or a crowd of host clients costs fixed
//! memory: [`MAX_CONNECTIONS`] connections (RST beyond), [`MAX_CONNECT_LINE`] bytes per
//! CONNECT line (malformed or longer lines close the client), [`MAX_PENDING_CLIENTS`] clients
//! waiting to send one, [`MAX_ORPHAN_RST`] queued RSTs for unknown connections, at most one of
//! each control packet owed per connection, and per call at most
//! [`MAX_PACKETS_PER_CALL`] packets each way and [`EVENTS_PER_CALL`] host events (the device
//! returns `true`, "call again", when it stops early).
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
//! use smolvm::devices::virtio::{VirtioDevice, DEVICE_ID_VSOCK};
//!
//! let dir = std::env::temp_dir().join(format!("smolvm-doc-vsock-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let vsock = Vsock::new(VsockConfig::new(3).uds_path(dir.join("v.sock")))?;
//! assert_eq!(vsock.device_type(), DEVICE_ID_VSOCK);
//! let host = vsock.host(); // keep this; the device goes to the transport
//! # drop((vsock, host));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod connection;
pub mod device;
pub mod host;
mod muxer;
pub mod packet;

pub use connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use device::{
    Vsock, VsockConfig, VsockError, VsockStats, MAX_PACKETS_PER_CALL, MAX_PKT_PAYLOAD,
    MAX_UDS_PATH_LEN, QUEUE_SIZE,
};
pub use host::{VsockHost, VsockListener, ACCEPT_BACKLOG, MAX_PENDING_REQUESTS};
pub use muxer::{
    EVENTS_PER_CALL, FIRST_LOCAL_PORT, MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_ORPHAN_RST,
    MAX_PENDING_CLIENTS,
};
pub use packet::{PacketError, PacketHeader};

//! One vsock stream connection between a guest port and a host Unix stream: its state, the
//! credit accounting of both directions and the bounded guest→host buffer.
//!
//! # Credit (virtio 1.2, 5.10.6.3)
//!
//! Each side advertises `buf_alloc` (its receive buffer) and `fwd_cnt` (bytes it consumed,
//! free-running `u32`). A sender may have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`
//! bytes in flight.
//!
//! - Guest→host: we advertise [`BUF_ALLOC`]. Payload goes straight to the Unix stream; what the
//!   stream does not take is kept in a ring buffer of at most [`BUF_ALLOC`] bytes, and
//!   `fwd_cnt` counts bytes the stream accepted. So a guest that honours credit never overflows
//!   the buffer, and one that does not is reset ([`Connection::push_from_guest`] refuses).
//! - Host→guest: we read from the Unix stream only up to the guest's credit
//!   ([`Connection::peer_credit`]); with none we stop reading (and ask with CREDIT_REQUEST), so
//!   nothing is ever buffered in that direction.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;

use super::packet::{VSOCK_SHUTDOWN_F_RECEIVE, VSOCK_SHUTDOWN_F_SEND};

/// Receive buffer advertised to the guest per connection (`buf_alloc`), and the most bytes
/// buffered guest→host when the Unix peer is slow.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Send a CREDIT_UPDATE once this many bytes were consumed since the last `fwd_cnt` the guest
/// saw: the guest then always knows of at least `BUF_ALLOC - CREDIT_UPDATE_THRESHOLD` bytes of
/// free space, without an update per packet.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// Control packets owed to the guest (bit set; one of each at most, so the queue of owed
/// packets is bounded by the number of connections whatever the guest does).
pub(crate) mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 1 << 1;
    pub const CREDIT_UPDATE: u8 = 1 << 2;
    pub const CREDIT_REQUEST: u8 = 1 << 3;
    pub const SHUTDOWN: u8 = 1 << 4;
}

/// Who waits for a host-initiated connection to be answered.
#[derive(Debug)]
pub(crate) enum Origin {
    /// Guest-initiated (we answered RESPONSE ourselves).
    Guest,
    /// A client of the Unix listener: gets `OK <port>\n` on RESPONSE.
    UnixClient,
    /// [`VsockHost::connect`](super::VsockHost::connect): told `Ok` on RESPONSE, the error
    /// kind otherwise (`None` once told).
    InProcess(Option<SyncSender<Result<(), std::io::ErrorKind>>>),
}

/// One connection (see the [module documentation](self)).
#[derive(Debug)]
pub(crate) struct Connection {
    pub state: ConnState,
    pub origin: Origin,
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    pub stream: UnixStream,
    /// Guest→host bytes the Unix stream has not taken yet (at most [`BUF_ALLOC`]).
    tx_buf: VecDeque<u8>,
    /// Bytes written to the Unix stream (our `fwd_cnt`).
    pub fwd_cnt: u32,
    /// `fwd_cnt` in the last packet we sent the guest.
    pub last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest (host→guest).
    pub rx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Control packets owed to the guest ([`pending`] bits).
    pub pending: u8,
    /// SHUTDOWN flags the guest sent (accumulated: they are permanent).
    pub guest_shutdown: u32,
    /// SHUTDOWN flags we sent (accumulated).
    pub host_shutdown: u32,
    /// The Unix stream reported readable and was not read dry yet.
    pub readable: bool,
    /// The Unix stream returned end-of-file (or a read error).
    pub read_eof: bool,
    /// The Unix stream cannot take more data (hang-up or write error).
    pub write_closed: bool,
    /// Epoll reported HUP or ERR: it will keep doing so, so the stream is deregistered whenever
    /// there is nothing to wait for.
    pub hup: bool,
    /// Interest currently registered in the muxer's epoll (`None`: not registered).
    pub registered: Option<u32>,
    /// In the muxer's rx queue.
    pub scheduled: bool,
}

impl Connection {
    pub fn new(
        state: ConnState,
        origin: Origin,
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
    ) -> Connection {
        Connection {
            state,
            origin,
            local_port,
            peer_port,
            stream,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            pending: 0,
            guest_shutdown: 0,
            host_shutdown: 0,
            readable: false,
            read_eof: false,
            write_closed: false,
            hup: false,
            registered: None,
            scheduled: false,
        }
    }

    /// Records the credit fields of a guest packet.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now. A guest reporting a `fwd_cnt` ahead of what we sent makes
    /// the wrapping difference huge, so the credit is 0 rather than an overflow.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes buffered guest→host.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Whether the guest still sees at least [`CREDIT_UPDATE_THRESHOLD`] bytes less free space
    /// than there is.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Guest→host payload: written to the Unix stream, the rest buffered.
    ///
    /// # Errors
    /// `InvalidData` when the guest sent more than its credit (the buffer would exceed
    /// [`BUF_ALLOC`]); the stream's write error otherwise. Either way the caller resets the
    /// connection. A closed write side drops the data silently (the guest was or will be told
    /// with SHUTDOWN).
    pub fn push_from_guest(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx_buf.len() + data.len() > BUF_ALLOC as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "guest sent {} bytes with {} buffered: more than its credit of {BUF_ALLOC}",
                    data.len(),
                    self.tx_buf.len()
                ),
            ));
        }
        if self.write_closed {
            return Ok(());
        }
        let written = if self.tx_buf.is_empty() {
            self.write_some(data)?
        } else {
            0
        };
        self.tx_buf.extend(&data[written..]);
        Ok(())
    }

    /// Writes buffered guest→host bytes to the Unix stream until it would block. Returns
    /// whether the buffer is now empty.
    ///
    /// # Errors
    /// The stream's write error (the peer went away).
    pub fn flush(&mut self) -> io::Result<bool> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let written = match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.tx_buf.drain(..written);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        Ok(true)
    }

    /// Drops buffered guest→host data (the stream cannot take it any more).
    pub fn discard_buffer(&mut self) {
        self.tx_buf = VecDeque::new();
    }

    fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < data.len() {
            match send_nosignal(&self.stream, &data[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
        Ok(done)
    }

    /// SHUTDOWN flags the host side should have sent by now: SEND once the stream hit
    /// end-of-file, RECEIVE once it cannot take data.
    pub fn wanted_host_shutdown(&self) -> u32 {
        let mut f = 0;
        if self.read_eof {
            f |= VSOCK_SHUTDOWN_F_SEND;
        }
        if self.write_closed {
            f |= VSOCK_SHUTDOWN_F_RECEIVE;
        }
        f
    }

    /// Whether the guest said it will neither send nor receive.
    pub fn guest_fully_shut(&self) -> bool {
        self.guest_shutdown & (VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE)
            == (VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE)
    }

    /// Whether reading the stream now could produce a packet for the guest.
    pub fn can_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.read_eof
            && self.guest_shutdown & VSOCK_SHUTDOWN_F_RECEIVE == 0
            && self.peer_credit() > 0
    }

    /// Whether the connection owes the guest a packet now.
    pub fn has_rx(&self) -> bool {
        self.pending != 0 || (self.readable && self.can_read())
    }
}

/// `write` for a Unix stream without SIGPIPE: a peer that vanished mid-write is an
/// `EPIPE` error here, never a signal that would kill a host program which did not ignore
/// SIGPIPE (Rust binaries do; programs embedding smolvm through FFI may not).
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes and the descriptor is owned by `stream`,
    // which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (
            Connection::new(ConnState::Established, Origin::Guest, 1, 2, a),
            b,
        )
    }

    #[test]
    fn credit_is_bounded_and_wraps() {
        let (mut c, _peer) = conn();
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.rx_cnt = 1100; // more than allowed: no underflow
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(1000, 1100);
        assert_eq!(c.peer_credit(), 1000);
        // Free-running counters across the wrap.
        c.rx_cnt = 5u32.wrapping_sub(10);
        c.update_peer_credit(100, 5u32.wrapping_sub(50));
        assert_eq!(c.peer_credit(), 60);
        // A fwd_cnt from the future is hostile: no credit.
        c.update_peer_credit(100, c.rx_cnt.wrapping_add(1));
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_is_buffered_up_to_buf_alloc() {
        let (mut c, mut peer) = conn();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        // Fill the socket buffer, then ours.
        loop {
            match c.push_from_guest(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    break;
                }
            }
            assert!(sent < 64 << 20, "never refused");
        }
        assert!(c.buffered() <= BUF_ALLOC as usize);
        assert!(c.buffered() + chunk.len() > BUF_ALLOC as usize);
        assert_eq!(c.fwd_cnt as usize + c.buffered(), sent);
        // Draining the peer lets everything through, in order.
        peer.set_nonblocking(true).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while got < sent {
            c.flush().unwrap();
            match peer.read(&mut buf) {
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 7));
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(c.flush().unwrap());
        assert_eq!(c.fwd_cnt as usize, sent);
        assert!(c.credit_update_due());
    }

    #[test]
    fn shutdown_flags_follow_the_stream() {
        let (mut c, _peer) = conn();
        assert_eq!(c.wanted_host_shutdown(), 0);
        c.read_eof = true;
        assert_eq!(c.wanted_host_shutdown(), VSOCK_SHUTDOWN_F_SEND);
        c.write_closed = true;
        assert_eq!(c.wanted_host_shutdown(), 3);
        c.guest_shutdown = VSOCK_SHUTDOWN_F_SEND;
        assert!(!c.guest_fully_shut());
        c.guest_shutdown |= VSOCK_SHUTDOWN_F_RECEIVE;
        assert!(c.guest_fully_shut());
    }
}

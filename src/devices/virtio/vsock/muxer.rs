//! The host side of the device: the connection table, the Unix-socket front end (listener,
//! `CONNECT <port>` protocol, `<path>_<port>` connects), in-process requests, and one epoll
//! descriptor watching all of it.
//!
//! The device event loop watches a fixed set of descriptors per device, so the muxer lists only
//! its epoll descriptor ([`Muxer::epoll_fd`]) and keeps its changing set of sockets inside. Every
//! socket is registered only for what the muxer can serve right now (a connection is read only
//! while the guest has credit and the data is not already waiting to be delivered; written only
//! while guest data is buffered; deregistered after a hang-up when there is nothing left to
//! wait for): level-triggered readiness then never reports something that cannot be consumed,
//! and the loop never spins.
//!
//! Packets owed to the guest are found through a queue of connections with something to send
//! (each at most once) plus a bounded queue of RSTs for packets that match no connection; data
//! is read from a Unix stream only when an rx buffer is there to take it. Nothing on the host
//! side grows with what the guest sends.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{pending, ConnState, Connection, Origin, BUF_ALLOC};
use super::host::{HostRequest, HostShared};
use super::packet::{
    Op, PacketHeader, VSOCK_HOST_CID, VSOCK_SHUTDOWN_F_RECEIVE, VSOCK_SHUTDOWN_F_SEND,
    VSOCK_TYPE_STREAM,
};
use super::VsockStats;

/// Open connections at most; guest REQUESTs beyond are answered RST, host connects refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>\n` line (bytes, newline included); longer lines close the client.
pub const MAX_CONNECT_LINE: usize = 32;
/// Unix clients that connected but have not sent their CONNECT line yet, at most.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// RSTs for packets matching no connection waiting for an rx buffer, at most; more are
/// dropped (a guest flooding unknown ports only loses answers it did not need).
pub const MAX_ORPHAN_RST: usize = 1024;
/// Host events (ready sockets) served per `host_event` call of the device at most.
pub const EVENTS_PER_CALL: usize = 64;
/// First local (host) port handed out to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

const KIND_LISTENER: u64 = 1;
const KIND_WAKE: u64 = 2;
const KIND_CLIENT: u64 = 3;
const KIND_CONN: u64 = 4;

const EV_IN: u32 = libc::EPOLLIN as u32;
const EV_OUT: u32 = libc::EPOLLOUT as u32;
const EV_RDHUP: u32 = libc::EPOLLRDHUP as u32;
const EV_HUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

fn token(kind: u64, index: usize) -> u64 {
    (kind << 32) | index as u64
}

/// A Unix client that has not sent its CONNECT line yet.
struct Client {
    stream: UnixStream,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
}

/// Why a connection goes away (what its waiter is told).
#[derive(Clone, Copy)]
enum Close {
    /// Tell the guest with RST.
    Rst,
    /// The guest reset it (or refused it): no packet.
    Quiet,
    /// Device reset: no packet, waiters get `ConnectionReset`.
    DeviceReset,
}

/// See the [module documentation](self).
pub(crate) struct Muxer {
    guest_cid: u64,
    epoll: Epoll,
    listener: Option<UnixListener>,
    uds_path: Option<PathBuf>,
    host: Arc<HostShared>,
    requests: Receiver<HostRequest>,
    conns: Vec<Option<Connection>>,
    free: Vec<usize>,
    by_key: HashMap<(u32, u32), usize>,
    clients: Vec<Option<Client>>,
    free_clients: Vec<usize>,
    rx_queue: VecDeque<usize>,
    orphan_rst: VecDeque<PacketHeader>,
    next_local_port: u32,
    events: Vec<EpollEvent>,
    /// A spare descriptor (`/dev/null`), closed to make room when `accept` fails with
    /// EMFILE/ENFILE so the waiting client can be taken off the backlog and refused.
    reserve_fd: Option<std::fs::File>,
    pub stats: VsockStats,
}

impl Muxer {
    /// A muxer for guest `guest_cid`, listening at `uds_path` when given (bound already).
    pub fn new(
        guest_cid: u64,
        listener: Option<(UnixListener, PathBuf)>,
        host: Arc<HostShared>,
        requests: Receiver<HostRequest>,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let (listener, uds_path) = match listener {
            Some((l, p)) => {
                l.set_nonblocking(true)?;
                epoll.ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(KIND_LISTENER, 0)),
                )?;
                (Some(l), Some(p))
            }
            None => (None, None),
        };
        epoll.ctl(
            ControlOperation::Add,
            host.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token(KIND_WAKE, 0)),
        )?;
        Ok(Muxer {
            guest_cid,
            epoll,
            listener,
            uds_path,
            host,
            requests,
            conns: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            clients: Vec::new(),
            free_clients: Vec::new(),
            rx_queue: VecDeque::new(),
            orphan_rst: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            events: vec![EpollEvent::default(); EVENTS_PER_CALL],
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            stats: VsockStats::default(),
        })
    }

    /// The descriptor the device event loop watches (readable when anything inside is ready).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.by_key.len()
    }

    /// Whether a packet for the guest may be ready ([`next_rx`](Self::next_rx) may still say
    /// no: a stream that turned out to have no data).
    pub fn has_rx(&self) -> bool {
        !self.orphan_rst.is_empty() || !self.rx_queue.is_empty()
    }

    /// Closes every connection and pending client (device reset). The listener and the
    /// in-process listeners stay.
    pub fn reset(&mut self) {
        for slot in 0..self.conns.len() {
            if self.conns[slot].is_some() {
                self.remove(slot, Close::DeviceReset);
            }
        }
        for i in 0..self.clients.len() {
            self.drop_client(i);
        }
        self.orphan_rst.clear();
        self.rx_queue.clear();
        self.next_local_port = FIRST_LOCAL_PORT;
    }

    // ---------------------------------------------------------------- guest → host packets

    /// A packet from the guest (already through [`PacketHeader::validate`]) with its payload
    /// (empty unless RW).
    pub fn handle_guest(&mut self, hdr: &PacketHeader, op: Op, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        let Some(&slot) = self.by_key.get(&key) else {
            match op {
                Op::Request => self.guest_connect(hdr),
                Op::Rst => {}
                _ => {
                    log::debug!("vsock: {op:?} for unknown connection {key:?}: RST");
                    self.push_rst(hdr.dst_port, hdr.src_port);
                }
            }
            return;
        };
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match (conn.state, op) {
            (ConnState::Connecting, Op::Response) => {
                conn.state = ConnState::Established;
                let ok = match &mut conn.origin {
                    Origin::UnixClient => {
                        let line = format!("OK {}\n", conn.local_port);
                        // A fresh socket always has room for a few bytes.
                        (&conn.stream).write_all(line.as_bytes()).is_ok()
                    }
                    Origin::InProcess(reply) => {
                        reply.take().is_some_and(|r| r.try_send(Ok(())).is_ok())
                    }
                    Origin::Guest => true,
                };
                if !ok {
                    self.remove(slot, Close::Rst);
                    return;
                }
            }
            (ConnState::Connecting, Op::Rst) | (ConnState::Established, Op::Rst) => {
                self.remove(slot, Close::Quiet);
                return;
            }
            (ConnState::Connecting, _) | (ConnState::Established, Op::Request | Op::Response) => {
                log::debug!("vsock: unexpected {op:?} on connection {key:?}: RST");
                self.remove(slot, Close::Rst);
                return;
            }
            (ConnState::Established, Op::Rw) => {
                if conn.guest_shutdown & VSOCK_SHUTDOWN_F_SEND != 0 {
                    log::debug!("vsock: data after SHUTDOWN(SEND) on {key:?}: dropped");
                } else if let Err(e) = conn.push_from_guest(payload) {
                    if e.kind() == io::ErrorKind::InvalidData {
                        log::debug!("vsock: {key:?}: {e}: RST");
                        self.stats.credit_violations += 1;
                        self.remove(slot, Close::Rst);
                        return;
                    }
                    // The Unix peer went away: tell the guest we receive no more.
                    conn.write_closed = true;
                    conn.discard_buffer();
                } else {
                    self.stats.bytes_from_guest += payload.len() as u64;
                    if conn.credit_update_due() && conn.buffered() == 0 {
                        conn.pending |= pending::CREDIT_UPDATE;
                    }
                }
            }
            (ConnState::Established, Op::Shutdown) => {
                conn.guest_shutdown |=
                    hdr.flags & (VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE);
            }
            (ConnState::Established, Op::CreditUpdate) => {}
            (ConnState::Established, Op::CreditRequest) => conn.pending |= pending::CREDIT_UPDATE,
        }
        self.refresh(slot);
    }

    /// Resets the connection a malformed guest packet belongs to (or answers RST when it
    /// belongs to none): its data cannot be delivered intact.
    pub fn abort(&mut self, hdr: &PacketHeader) {
        match self.by_key.get(&(hdr.dst_port, hdr.src_port)) {
            Some(&slot) => self.remove(slot, Close::Rst),
            None => self.reject(hdr),
        }
    }

    /// Answers a packet the guest sent to the host with an unsupported socket type.
    pub fn reject(&mut self, hdr: &PacketHeader) {
        if hdr.op != Op::Rst as u16 {
            self.push_rst(hdr.dst_port, hdr.src_port);
        }
    }

    fn guest_connect(&mut self, hdr: &PacketHeader) {
        let (local, peer) = (hdr.dst_port, hdr.src_port);
        if self.by_key.len() >= MAX_CONNECTIONS {
            log::debug!("vsock: connection limit reached: RST to guest port {peer}");
            self.push_rst(local, peer);
            return;
        }
        let stream = match self.open_host_side(local, peer) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connection to host port {local}: {e}: RST");
                self.push_rst(local, peer);
                return;
            }
        };
        let mut conn = Connection::new(ConnState::Established, Origin::Guest, local, peer, stream);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        conn.pending |= pending::RESPONSE;
        self.insert(conn);
    }

    /// The host end of a guest-initiated connection: an in-process listener's socketpair or
    /// `<uds_path>_<port>`.
    fn open_host_side(&mut self, local: u32, peer: u32) -> io::Result<UnixStream> {
        if let Some(tx) = self.host.listeners().get(&local) {
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            tx.try_send((theirs, peer))
                .map_err(|_| io::Error::other("listener backlog full or listener gone"))?;
            return Ok(ours);
        }
        let Some(base) = &self.uds_path else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "no listener and no uds_path",
            ));
        };
        let mut path = base.as_os_str().to_owned();
        path.push(format!("_{local}"));
        connect_nonblocking(Path::new(&path))
    }

    // ---------------------------------------------------------------- host → guest packets

    /// The next packet for the guest, its payload (RW) read into `payload` (at most its length,
    /// at most the guest's credit). `None`: nothing to send now.
    pub fn next_rx(&mut self, payload: &mut [u8]) -> Option<PacketHeader> {
        if let Some(h) = self.orphan_rst.pop_front() {
            self.stats.rst_sent += 1;
            return Some(h);
        }
        // Each queued connection at most once per call: one that cannot produce a packet now
        // (nothing read, no room for data) goes back to the end of the queue.
        for _ in 0..self.rx_queue.len() {
            let Some(slot) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            if !conn.scheduled {
                continue;
            }
            conn.scheduled = false;
            let hdr = self.produce(slot, payload);
            self.refresh(slot);
            if hdr.is_some() {
                return hdr;
            }
        }
        None
    }

    fn produce(&mut self, slot: usize, payload: &mut [u8]) -> Option<PacketHeader> {
        let guest_cid = self.guest_cid;
        let conn = self.conns[slot].as_mut()?;
        let mut h = PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: conn.local_port,
            dst_port: conn.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: 0,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.fwd_cnt,
        };
        let op = if conn.pending & pending::REQUEST != 0 {
            conn.pending &= !pending::REQUEST;
            Op::Request
        } else if conn.pending & pending::RESPONSE != 0 {
            conn.pending &= !pending::RESPONSE;
            Op::Response
        } else {
            let mut data = None;
            if conn.readable && conn.can_read() && !payload.is_empty() {
                let n = payload.len().min(conn.peer_credit() as usize);
                match (&conn.stream).read(&mut payload[..n]) {
                    Ok(0) => {
                        conn.readable = false;
                        conn.read_eof = true;
                    }
                    Ok(n) => data = Some(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!(
                            "vsock: reading host stream of port {}: {e}",
                            conn.local_port
                        );
                        conn.readable = false;
                        conn.read_eof = true;
                        conn.write_closed = true;
                        conn.discard_buffer();
                    }
                }
            }
            let wanted = conn.wanted_host_shutdown();
            if wanted & !conn.host_shutdown != 0 {
                conn.host_shutdown |= wanted;
                conn.pending |= pending::SHUTDOWN;
            }
            if let Some(n) = data {
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                self.stats.bytes_to_guest += n as u64;
                if conn.peer_credit() == 0 {
                    conn.pending |= pending::CREDIT_REQUEST;
                }
                h.len = n as u32;
                Op::Rw
            } else if conn.pending & pending::CREDIT_UPDATE != 0 {
                conn.pending &= !pending::CREDIT_UPDATE;
                Op::CreditUpdate
            } else if conn.pending & pending::SHUTDOWN != 0 {
                conn.pending &= !pending::SHUTDOWN;
                h.flags = conn.host_shutdown;
                Op::Shutdown
            } else if conn.pending & pending::CREDIT_REQUEST != 0 {
                conn.pending &= !pending::CREDIT_REQUEST;
                if conn.peer_credit() > 0 {
                    return None;
                }
                Op::CreditRequest
            } else {
                return None;
            }
        };
        conn.last_fwd_cnt_sent = conn.fwd_cnt;
        h.op = op as u16;
        Some(h)
    }

    // ---------------------------------------------------------------- host events

    /// Serves up to [`EVENTS_PER_CALL`] ready sources. Returns `true` when there may be more.
    pub fn process_events(&mut self) -> bool {
        let mut events = std::mem::take(&mut self.events);
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("vsock: epoll_wait failed: {e}");
                }
                self.events = events;
                return e.kind() == io::ErrorKind::Interrupted;
            }
        };
        for ev in &events[..n] {
            let data = ev.data();
            let ready = ev.events();
            let index = (data & 0xffff_ffff) as usize;
            match data >> 32 {
                KIND_LISTENER => self.accept_clients(),
                KIND_WAKE => self.serve_requests(),
                KIND_CLIENT => self.serve_client(index),
                KIND_CONN => self.serve_conn(index, ready),
                _ => {}
            }
        }
        self.events = events;
        n == EVENTS_PER_CALL
    }

    fn accept_clients(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..EVENTS_PER_CALL {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors. The client stays in the backlog and the listener
                    // stays readable, so returning would make the device loop spin: free the
                    // reserve descriptor, take the client and close it (refused), and take
                    // the reserve back.
                    self.reserve_fd = None;
                    let refused = listener.accept();
                    self.reserve_fd = std::fs::File::open("/dev/null").ok();
                    log::warn!(
                        "vsock: out of file descriptors ({e}): refused a client of the Unix \
                         socket"
                    );
                    if refused.is_err() || self.reserve_fd.is_none() {
                        // Could not drain it: stop watching the listener rather than spin.
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            listener.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        log::error!(
                            "vsock: the Unix socket no longer accepts clients (no descriptors)"
                        );
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    log::debug!("vsock: accept on the Unix listener: {e}");
                    return;
                }
            };
            let live = self.clients.len() - self.free_clients.len();
            if live >= MAX_PENDING_CLIENTS || stream.set_nonblocking(true).is_err() {
                log::debug!("vsock: too many clients waiting to send CONNECT: closing one");
                continue;
            }
            let i = match self.free_clients.pop() {
                Some(i) => i,
                None => {
                    self.clients.push(None);
                    self.clients.len() - 1
                }
            };
            let ev = EpollEvent::new(EventSet::IN, token(KIND_CLIENT, i));
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                log::warn!("vsock: cannot watch a Unix client: {e}");
                self.free_clients.push(i);
                continue;
            }
            self.clients[i] = Some(Client {
                stream,
                line: [0; MAX_CONNECT_LINE],
                len: 0,
            });
        }
    }

    fn drop_client(&mut self, i: usize) {
        if let Some(c) = self.clients.get_mut(i).and_then(Option::take) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.free_clients.push(i);
        }
    }

    /// Reads a client's CONNECT line a byte at a time (so no byte of the stream that follows
    /// is consumed), bounded by [`MAX_CONNECT_LINE`].
    fn serve_client(&mut self, i: usize) {
        let Some(c) = self.clients.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        // Some(port or None for malformed): the line is complete; None: wait or drop.
        let mut done = None;
        let mut dead = false;
        while done.is_none() && !dead {
            if c.len == MAX_CONNECT_LINE {
                log::debug!("vsock: CONNECT line too long: closing the client");
                dead = true;
                break;
            }
            let mut b = [0u8; 1];
            match (&c.stream).read(&mut b) {
                Ok(0) => dead = true,
                Ok(_) => {
                    c.line[c.len] = b[0];
                    c.len += 1;
                    if b[0] == b'\n' {
                        done = Some(parse_connect(&c.line[..c.len]));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => dead = true,
            }
        }
        if dead {
            self.drop_client(i);
            return;
        }
        let Some(c) = self.clients.get_mut(i).and_then(Option::take) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        self.free_clients.push(i);
        let Some(port) = done.flatten() else {
            log::debug!("vsock: malformed CONNECT line: closing the client");
            return;
        };
        if self.by_key.len() >= MAX_CONNECTIONS {
            log::debug!("vsock: connection limit reached: closing a Unix client");
            return;
        }
        self.host_connect(port, c.stream, Origin::UnixClient);
    }

    fn serve_requests(&mut self) {
        let _ = self.host.wake.read();
        loop {
            match self.requests.try_recv() {
                Ok(HostRequest::Connect {
                    port,
                    stream,
                    reply,
                }) => {
                    if self.by_key.len() >= MAX_CONNECTIONS {
                        let _ = reply.try_send(Err(io::ErrorKind::ConnectionAborted));
                        continue;
                    }
                    self.host_connect(port, stream, Origin::InProcess(Some(reply)));
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    /// A host-initiated connection to guest `port`: REQUEST queued, waiting for RESPONSE.
    fn host_connect(&mut self, port: u32, stream: UnixStream, origin: Origin) {
        let mut local = self.next_local_port;
        for _ in 0..=MAX_CONNECTIONS {
            local = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_key.contains_key(&(local, port)) {
                break;
            }
        }
        let mut conn = Connection::new(ConnState::Connecting, origin, local, port, stream);
        conn.pending |= pending::REQUEST;
        self.insert(conn);
    }

    fn serve_conn(&mut self, slot: usize, ready: u32) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.state == ConnState::Connecting {
            if ready & (EV_HUP | EV_RDHUP) != 0 {
                // The client gave up before the guest answered.
                self.remove(slot, Close::Rst);
            }
            return;
        }
        if ready & EV_HUP != 0 {
            conn.hup = true;
            conn.write_closed = true;
            conn.discard_buffer();
            if !conn.read_eof {
                conn.readable = true;
            }
        }
        if ready & EV_IN != 0 {
            conn.readable = true;
        }
        if ready & EV_OUT != 0 && !conn.write_closed {
            match conn.flush() {
                Ok(_) => {
                    if conn.credit_update_due() {
                        conn.pending |= pending::CREDIT_UPDATE;
                    }
                }
                Err(e) => {
                    log::debug!(
                        "vsock: writing host stream of port {}: {e}",
                        conn.local_port
                    );
                    conn.write_closed = true;
                    conn.discard_buffer();
                }
            }
        }
        self.refresh(slot);
    }

    // ---------------------------------------------------------------- table upkeep

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        self.conns[slot] = Some(conn);
        self.by_key.insert(key, slot);
        self.stats.connections_opened += 1;
        self.refresh(slot);
    }

    /// Brings a connection's shutdown bookkeeping, epoll interest and rx scheduling up to date
    /// after anything changed.
    fn refresh(&mut self, slot: usize) {
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        if conn.state == ConnState::Established {
            // Guest stopped sending and everything it sent is out: pass the half-close on.
            if conn.guest_shutdown & VSOCK_SHUTDOWN_F_SEND != 0
                && conn.buffered() == 0
                && !conn.write_closed
            {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                conn.write_closed = true;
                // Not the peer's doing: no SHUTDOWN(RECEIVE) owed for it.
                conn.host_shutdown |= VSOCK_SHUTDOWN_F_RECEIVE;
            }
            if conn.guest_fully_shut() && conn.buffered() == 0 {
                // Clean disconnect (5.10.6.6): the guest is done both ways, we answer RST.
                self.remove(slot, Close::Rst);
                return;
            }
            let wanted = conn.wanted_host_shutdown();
            if wanted & !conn.host_shutdown != 0 {
                conn.host_shutdown |= wanted;
                conn.pending |= pending::SHUTDOWN;
            }
        }
        let mut ev = 0;
        if conn.state == ConnState::Connecting {
            ev |= EV_RDHUP;
        } else {
            if !conn.readable && conn.can_read() {
                ev |= EV_IN;
            }
            if conn.buffered() > 0 && !conn.write_closed {
                ev |= EV_OUT;
            }
        }
        let target = if ev == 0 && conn.hup { None } else { Some(ev) };
        if target != conn.registered {
            let fd = conn.stream.as_raw_fd();
            let r = match (conn.registered, target) {
                (None, Some(ev)) => self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::from_bits_truncate(ev), token(KIND_CONN, slot)),
                ),
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(EventSet::from_bits_truncate(ev), token(KIND_CONN, slot)),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match r {
                Ok(()) => conn.registered = target,
                Err(e) => log::warn!("vsock: epoll_ctl on a connection: {e}"),
            }
        }
        if conn.has_rx() && !conn.scheduled {
            conn.scheduled = true;
            self.rx_queue.push_back(slot);
        }
    }

    fn remove(&mut self, slot: usize, why: Close) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.by_key.remove(&(conn.local_port, conn.peer_port));
        if conn.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if conn.scheduled {
            self.rx_queue.retain(|&s| s != slot);
        }
        if let Some(reply) = match &mut conn.origin {
            Origin::InProcess(reply) => reply.take(),
            _ => None,
        } {
            let kind = match why {
                Close::DeviceReset => io::ErrorKind::ConnectionReset,
                _ => io::ErrorKind::ConnectionRefused,
            };
            let _ = reply.try_send(Err(kind));
        }
        if let Close::Rst = why {
            self.push_rst(conn.local_port, conn.peer_port);
        }
    }

    fn push_rst(&mut self, local: u32, peer: u32) {
        if self.orphan_rst.len() >= MAX_ORPHAN_RST {
            self.stats.rst_dropped += 1;
            return;
        }
        self.orphan_rst.push_back(PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Wake in-process accept() callers: the device is gone.
        self.host.listeners().clear();
        if let (Some(_), Some(path)) = (&self.listener, &self.uds_path) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `CONNECT <port>\n` (an optional `\r` before the newline) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `sockaddr_un` for `path`.
///
/// # Errors
/// `InvalidInput` when the path does not fit `sun_path` (with its NUL) or contains a NUL.
pub(crate) fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not fit a Unix socket address", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Connects to the Unix socket at `path` without blocking the device thread: a listener whose
/// backlog is full makes this fail (`WouldBlock`) instead of waiting.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un, `len` bytes of it are valid, and it
    // outlives the call.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 5 \n",
            b"connect 5\n",
            b"CONNECT 5",
            b"CONNECT  5\n",
            b"CONNECT +5\n",
            b"\n",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn sun_path_limit() {
        assert!(sockaddr_un(Path::new("/tmp/x.sock")).is_ok());
        let long = "/".to_string() + &"a".repeat(107);
        assert!(sockaddr_un(Path::new(&long)).is_err());
        let fits = "/".to_string() + &"a".repeat(106);
        assert!(sockaddr_un(Path::new(&fits)).is_ok());
    }
}

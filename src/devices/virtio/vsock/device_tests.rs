//! Unit tests of the virtio-vsock device, driven by a simulated Linux-style driver that lays out
//! the rx / tx / event rings and packets in guest memory by hand, with real Unix sockets on the
//! host side.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::vsock::connection::BUF_ALLOC;
use crate::devices::virtio::vsock::muxer::{FIRST_LOCAL_PORT, MAX_ORPHAN_RST};
use crate::devices::virtio::vsock::packet::{
    VSOCK_HOST_CID, VSOCK_SHUTDOWN_F_RECEIVE, VSOCK_SHUTDOWN_F_SEND, VSOCK_TYPE_STREAM,
};
use crate::memory;

const CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
const SIZE: u16 = 256;
/// Bytes of payload room in each rx buffer (Linux posts 4 KiB buffers).
const RX_PAYLOAD: u32 = 4096;
const TX_DATA: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const RX_DATA: u64 = 0x100_0000;
const RX_SLOT: u64 = 0x1_1000;
/// Generous bound for waiting on real sockets; only stops a broken test from hanging.
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Irq {
    used: AtomicU32,
    needs_reset: AtomicU32,
}

impl VirtioInterrupt for Irq {
    fn signal_used_queue(&self, _queue: u16) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

fn qbase(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}

/// A unique temp directory, removed when dropped.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "smolvm-vsock-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A received packet.
#[derive(Debug)]
struct Pkt {
    hdr: PacketHeader,
    data: Vec<u8>,
    used_len: u32,
}

impl Pkt {
    fn op(&self) -> Option<Op> {
        Op::from_u16(self.hdr.op)
    }
}

struct Driver {
    mem: GuestMemory,
    dev: Vsock,
    irq: Arc<Irq>,
    /// Per queue: next avail index, used entries consumed.
    avail: [u16; 3],
    used_seen: [u16; 3],
    /// Our receive buffer and consumed counter per (guest port, host port).
    buf_alloc: u32,
    fwd: HashMap<(u32, u32), u32>,
    rx_payload: u32,
    tx_n: u16,
    _dir: Option<TempDir>,
    uds: Option<PathBuf>,
}

impl Driver {
    fn new() -> Driver {
        Self::build(Vsock::new(VsockConfig::new(CID)).unwrap(), None, None)
    }

    fn with_uds() -> Driver {
        let dir = TempDir::new("dev");
        let path = dir.0.join("v.sock");
        let dev = Vsock::new(VsockConfig::new(CID).uds_path(&path)).unwrap();
        Self::build(dev, Some(dir), Some(path))
    }

    fn build(dev: Vsock, dir: Option<TempDir>, uds: Option<PathBuf>) -> Driver {
        let mem = memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut d = Driver {
            mem,
            dev,
            irq: Arc::new(Irq::default()),
            avail: [0; 3],
            used_seen: [0; 3],
            buf_alloc: BUF_ALLOC,
            fwd: HashMap::new(),
            rx_payload: RX_PAYLOAD,
            tx_n: 0,
            _dir: dir,
            uds,
        };
        d.activate();
        d
    }

    fn queues(&self) -> Vec<Queue> {
        (0..3)
            .map(|i| {
                let mut q = Queue::new(QUEUE_SIZE);
                q.size = SIZE;
                q.desc_table = GuestAddress(qbase(i));
                q.avail_ring = GuestAddress(qbase(i) + 0x1000);
                q.used_ring = GuestAddress(qbase(i) + 0x2000);
                q.event_idx = true;
                q.indirect = true;
                q.ready = true;
                assert!(q.is_valid(&self.mem));
                q
            })
            .collect()
    }

    /// Fresh rings, activation, and a full rx ring.
    fn activate(&mut self) {
        self.mem
            .write_slice(&vec![0u8; 0x3_0000], GuestAddress(qbase(0)))
            .unwrap();
        self.avail = [0; 3];
        self.used_seen = [0; 3];
        self.fwd.clear();
        let queues = self.queues();
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                features: self.dev.device_features(),
                interrupt: self.irq.clone(),
            })
            .unwrap();
        for _ in 0..SIZE {
            self.post_rx();
        }
        self.notify(0);
    }

    fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(qbase(q) + 16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.avail[q] % SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(qbase(q) + 0x1000 + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q].to_le(), GuestAddress(qbase(q) + 0x1000 + 2))
            .unwrap();
    }

    /// Posts one rx buffer (descriptor = slot, buffers return in order).
    fn post_rx(&mut self) {
        let i = self.avail[0] % SIZE;
        let addr = RX_DATA + u64::from(i) * RX_SLOT;
        self.write_desc(
            0,
            i,
            addr,
            HDR_LEN as u32 + self.rx_payload,
            VIRTQ_DESC_F_WRITE,
            0,
        );
        self.publish(0, i);
    }

    fn notify(&mut self, q: u16) {
        let mut n = 0;
        while self.dev.queue_notify(q) {
            n += 1;
            assert!(n < 10_000, "device never finished");
        }
    }

    /// Posts a tx packet (header and payload in two descriptors) and notifies.
    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) {
        self.queue_tx(hdr, payload);
        self.notify(1);
    }

    fn queue_tx(&mut self, hdr: PacketHeader, payload: &[u8]) {
        // tx chains complete synchronously and in order: two descriptors per slot, rotating.
        let slot = self.tx_n % (SIZE / 2);
        self.tx_n = self.tx_n.wrapping_add(1);
        let (h, p) = (2 * slot, 2 * slot + 1);
        let addr = TX_DATA + u64::from(slot) * TX_SLOT;
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + 0x100))
            .unwrap();
        if payload.is_empty() {
            self.write_desc(1, h, addr, HDR_LEN as u32, 0, 0);
        } else {
            self.write_desc(1, h, addr, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, p);
            self.write_desc(1, p, addr + 0x100, payload.len() as u32, 0, 0);
        }
        self.publish(1, h);
    }

    fn hdr(&self, op: Op, guest_port: u32, host_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd.get(&(guest_port, host_port)).copied().unwrap_or(0),
        }
    }

    fn op(&mut self, op: Op, guest_port: u32, host_port: u32) {
        let h = self.hdr(op, guest_port, host_port);
        self.send(h, &[]);
    }

    fn rw(&mut self, guest_port: u32, host_port: u32, data: &[u8]) {
        let mut h = self.hdr(Op::Rw, guest_port, host_port);
        h.len = data.len() as u32;
        self.send(h, data);
    }

    fn shutdown(&mut self, guest_port: u32, host_port: u32, flags: u32) {
        let mut h = self.hdr(Op::Shutdown, guest_port, host_port);
        h.flags = flags;
        self.send(h, &[]);
    }

    /// The next used rx buffer, if any (reposted at once; RW payload counted as consumed).
    fn recv(&mut self) -> Option<Pkt> {
        let used: u16 = self.mem.read_obj(GuestAddress(qbase(0) + 0x2002)).unwrap();
        if used == self.used_seen[0] {
            return None;
        }
        let slot = u64::from(self.used_seen[0] % SIZE);
        let elem: [u8; 8] = self
            .mem
            .read_obj(GuestAddress(qbase(0) + 0x2004 + 8 * slot))
            .unwrap();
        self.used_seen[0] = self.used_seen[0].wrapping_add(1);
        let head = u32::from_le_bytes(elem[..4].try_into().unwrap()) as u64;
        let used_len = u32::from_le_bytes(elem[4..].try_into().unwrap());
        let addr = RX_DATA + head * RX_SLOT;
        let mut hb = [0u8; HDR_LEN];
        self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
        let hdr = PacketHeader::parse(&hb);
        let mut data = vec![0u8; used_len.saturating_sub(HDR_LEN as u32) as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        if hdr.op == Op::Rw as u16 {
            let key = (hdr.dst_port, hdr.src_port);
            let f = self.fwd.entry(key).or_insert(0);
            *f = f.wrapping_add(hdr.len);
        }
        self.post_rx();
        self.notify(0);
        Some(Pkt {
            hdr,
            data,
            used_len,
        })
    }

    /// Serves host events once.
    fn pump(&mut self) {
        let mut n = 0;
        while self.dev.host_event(0, HostInterest::READABLE) {
            n += 1;
            assert!(n < 10_000, "device never finished");
        }
    }

    /// Waits (for real sockets) until the device has a packet for the guest.
    fn wait_pkt(&mut self) -> Pkt {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(p) = self.recv() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet for the guest");
            self.wait_ready(Duration::from_millis(50));
            self.pump();
        }
    }

    /// Waits for a packet with `op`, skipping CREDIT_UPDATE / CREDIT_REQUEST.
    fn wait_op(&mut self, op: Op) -> Pkt {
        loop {
            let p = self.wait_pkt();
            match p.op() {
                Some(o) if o == op => return p,
                Some(Op::CreditUpdate | Op::CreditRequest) => continue,
                _ => panic!("expected {op:?}, got {p:?}"),
            }
        }
    }

    /// Whether the muxer's epoll reports readiness within `t`.
    fn wait_ready(&self, t: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.dev.host_events()[0].fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, t.as_millis() as i32) };
        r > 0
    }

    /// Pumps until no packet is produced for a short while; returns what was received.
    fn drain(&mut self) -> Vec<Pkt> {
        let mut out = Vec::new();
        loop {
            self.pump();
            match self.recv() {
                Some(p) => out.push(p),
                None => {
                    if !self.wait_ready(Duration::from_millis(20)) {
                        self.pump();
                        match self.recv() {
                            Some(p) => out.push(p),
                            None => return out,
                        }
                    }
                }
            }
        }
    }

    /// Guest connects `guest_port` → host `host_port` and expects RESPONSE.
    fn guest_connect(&mut self, guest_port: u32, host_port: u32) {
        self.op(Op::Request, guest_port, host_port);
        let p = self.wait_pkt();
        assert_eq!(p.op(), Some(Op::Response), "{p:?}");
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (host_port, guest_port));
        assert_eq!((p.hdr.src_cid, p.hdr.dst_cid), (VSOCK_HOST_CID, CID));
    }

    /// Reads guest RW payload for `key` until `n` bytes arrived.
    fn read_guest(&mut self, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let p = self.wait_op(Op::Rw);
            got.extend_from_slice(&p.data);
        }
        got
    }

    fn uds(&self) -> PathBuf {
        self.uds.clone().unwrap()
    }

    fn port_listener(&self, port: u32) -> UnixListener {
        let mut p = self.uds().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).unwrap()
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected end-of-file, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------ basics

#[test]
fn config_features_and_errors() {
    let d = Vsock::new(VsockConfig::new(0x1_2345)).unwrap();
    assert_eq!(d.device_type(), DEVICE_ID_VSOCK);
    assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    let mut b = [0u8; 12];
    d.read_config(0, &mut b);
    assert_eq!(&b[..8], &0x1_2345u64.to_le_bytes());
    assert_eq!(&b[8..], &[0; 4]);
    d.read_config(u64::MAX, &mut b[..2]);
    assert_eq!(&b[..2], &[0, 0]);
    assert_ne!(d.device_features() & (1 << VIRTIO_F_VERSION_1), 0);

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(VsockConfig::new(cid)),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
    let dir = TempDir::new("cfg");
    let long = dir.0.join("x".repeat(120));
    let e = Vsock::new(VsockConfig::new(3).uds_path(&long)).unwrap_err();
    assert!(matches!(e, VsockError::PathTooLong { .. }), "{e}");
    assert!(e.to_string().contains("shorter path"));
    let exists = dir.0.join("exists");
    std::fs::write(&exists, b"").unwrap();
    let e = Vsock::new(VsockConfig::new(3).uds_path(&exists)).unwrap_err();
    assert!(matches!(e, VsockError::PathExists(_)), "{e}");
    let nodir = dir.0.join("missing").join("v.sock");
    let e = Vsock::new(VsockConfig::new(3).uds_path(&nodir)).unwrap_err();
    assert!(matches!(e, VsockError::Bind { .. }), "{e}");

    // The socket file lives as long as the device.
    let path = dir.0.join("v.sock");
    let d = Vsock::new(VsockConfig::new(3).uds_path(&path)).unwrap();
    assert!(path.exists());
    drop(d);
    assert!(!path.exists());
}

#[test]
fn activation_needs_rx_and_tx() {
    let mut d = Driver::new();
    let mut queues = d.queues();
    queues[1].ready = false;
    d.dev.reset();
    let r = d.dev.activate(ActivateContext {
        mem: d.mem.clone(),
        queues,
        features: d.dev.device_features(),
        interrupt: d.irq.clone(),
    });
    assert_eq!(r.unwrap_err(), ActivateError::QueueNotReady(1));
    // The event queue is optional.
    let mut queues = d.queues();
    queues[2].ready = false;
    d.dev
        .activate(ActivateContext {
            mem: d.mem.clone(),
            queues,
            features: d.dev.device_features(),
            interrupt: d.irq.clone(),
        })
        .unwrap();
}

// ------------------------------------------------------------------------------ guest → host

#[test]
fn guest_connects_to_port_socket_and_data_flows_both_ways() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(1234);
    d.guest_connect(5000, 1234);
    assert_eq!(d.dev.stats().connections, 1);
    let (mut peer, _) = listener.accept().unwrap();
    d.rw(5000, 1234, b"hello host");
    assert_eq!(read_exact_timeout(&mut peer, 10), b"hello host");
    peer.write_all(b"hello guest").unwrap();
    let p = d.wait_op(Op::Rw);
    assert_eq!(p.data, b"hello guest");
    assert_eq!(p.used_len, HDR_LEN as u32 + 11);
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (1234, 5000));
    assert_eq!(p.hdr.buf_alloc, BUF_ALLOC);
    assert_eq!(p.hdr.fwd_cnt, 10, "bytes the peer took");
    // A large write is split by rx buffer size and arrives intact.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let w = {
        let mut peer = peer.try_clone().unwrap();
        let big = big.clone();
        std::thread::spawn(move || peer.write_all(&big).unwrap())
    };
    let got = d.read_guest(big.len());
    w.join().unwrap();
    assert_eq!(got, big);
    assert!(d.irq.used.load(Ordering::SeqCst) > 0);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut d = Driver::with_uds();
    d.op(Op::Request, 5000, 77);
    let p = d.wait_pkt();
    assert_eq!(p.op(), Some(Op::Rst));
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (77, 5000));
    // No uds_path at all: same.
    let mut d = Driver::new();
    d.op(Op::Request, 5000, 77);
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
    assert_eq!(d.dev.stats().connections, 0);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut d = Driver::new();
    d.rw(1, 2, b"x");
    d.op(Op::Response, 1, 3);
    d.op(Op::CreditRequest, 1, 4);
    d.shutdown(1, 5, VSOCK_SHUTDOWN_F_SEND);
    for port in 2..=5 {
        let p = d.recv().expect("an RST");
        assert_eq!(p.op(), Some(Op::Rst));
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (port, 1));
    }
    // RST for an unknown connection is not answered.
    d.op(Op::Rst, 1, 6);
    assert!(d.recv().is_none());
}

#[test]
fn in_process_listener_takes_precedence() {
    let mut d = Driver::with_uds();
    let file_listener = d.port_listener(9000);
    file_listener.set_nonblocking(true).unwrap();
    let host = d.dev.host();
    let l = host.listen(9000).unwrap();
    d.guest_connect(4000, 9000);
    let (mut s, guest_port) = l.accept_timeout(PATIENCE).unwrap();
    assert_eq!(guest_port, 4000);
    assert!(
        file_listener.accept().is_err(),
        "the socket file got it too"
    );
    d.rw(4000, 9000, b"via api");
    assert_eq!(read_exact_timeout(&mut s, 7), b"via api");
    s.write_all(b"back").unwrap();
    assert_eq!(d.wait_op(Op::Rw).data, b"back");
    // Dropped listener: the port falls back to the socket file.
    drop(l);
    d.guest_connect(4001, 9000);
    file_listener.set_nonblocking(false).unwrap();
    assert!(file_listener.accept().is_ok());
}

// ------------------------------------------------------------------------------ host → guest

#[test]
fn connect_protocol_host_to_guest() {
    let mut d = Driver::with_uds();
    let mut client = UnixStream::connect(d.uds()).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let req = d.wait_pkt();
    assert_eq!(req.op(), Some(Op::Request));
    assert_eq!(req.hdr.dst_port, 52);
    assert_eq!(req.hdr.dst_cid, CID);
    assert!(req.hdr.src_port >= FIRST_LOCAL_PORT);
    let host_port = req.hdr.src_port;
    d.op(Op::Response, 52, host_port);
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_exact_timeout(&mut client, ok.len()), ok.as_bytes());
    client.write_all(b"ping").unwrap();
    assert_eq!(d.wait_op(Op::Rw).data, b"ping");
    d.rw(52, host_port, b"pong");
    assert_eq!(read_exact_timeout(&mut client, 4), b"pong");

    // A second client gets another host port.
    let mut c2 = UnixStream::connect(d.uds()).unwrap();
    c2.write_all(b"CONNECT 52\r\n").unwrap();
    let req2 = d.wait_op(Op::Request);
    assert_ne!(req2.hdr.src_port, host_port);
    // The guest refuses: the client is closed.
    d.op(Op::Rst, 52, req2.hdr.src_port);
    assert_eof(&mut c2);
    assert_eq!(d.dev.stats().connections, 1);
}

#[test]
fn malformed_connect_lines_close_the_client() {
    let mut d = Driver::with_uds();
    let long = vec![b'9'; 40];
    let lines: Vec<&[u8]> = vec![
        b"CONNECT abc\n",
        b"HELLO 52\n",
        b"CONNECT 99999999999\n",
        b"CONNECT\n",
        b"connect 52\n",
        &long,
    ];
    for line in lines {
        let mut c = UnixStream::connect(d.uds()).unwrap();
        c.write_all(line).unwrap();
        let deadline = Instant::now() + PATIENCE;
        c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        loop {
            d.pump();
            let mut b = [0u8; 8];
            match c.read(&mut b) {
                Ok(0) => break,
                Ok(n) => panic!("unexpected reply {:?}", &b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(_) => {}
            }
            assert!(Instant::now() < deadline, "client not closed for {line:?}");
        }
    }
    // A client that disconnects before finishing its line is forgotten too.
    let mut c = UnixStream::connect(d.uds()).unwrap();
    c.write_all(b"CONN").unwrap();
    drop(c);
    let got = d.drain();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(d.dev.stats().connections, 0);
    // The listener still works.
    let mut c = UnixStream::connect(d.uds()).unwrap();
    c.write_all(b"CONNECT 1\n").unwrap();
    assert_eq!(d.wait_pkt().op(), Some(Op::Request));
}

#[test]
fn connect_client_giving_up_resets_the_guest() {
    let mut d = Driver::with_uds();
    let mut c = UnixStream::connect(d.uds()).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = d.wait_op(Op::Request);
    drop(c);
    let rst = d.wait_op(Op::Rst);
    assert_eq!(rst.hdr.src_port, req.hdr.src_port);
    assert_eq!(d.dev.stats().connections, 0);
    // The guest's late RESPONSE is answered RST.
    d.op(Op::Response, 52, req.hdr.src_port);
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
}

#[test]
fn in_process_connect_accepted_and_refused() {
    let mut d = Driver::new();
    let host = d.dev.host();
    let t = std::thread::spawn({
        let host = host.clone();
        move || host.connect(52, PATIENCE)
    });
    let req = d.wait_op(Op::Request);
    d.op(Op::Response, 52, req.hdr.src_port);
    let mut s = t.join().unwrap().unwrap();
    s.write_all(b"in-process").unwrap();
    assert_eq!(d.wait_op(Op::Rw).data, b"in-process");
    d.rw(52, req.hdr.src_port, b"reply");
    assert_eq!(read_exact_timeout(&mut s, 5), b"reply");

    let t = std::thread::spawn(move || host.connect(53, PATIENCE));
    let req = d.wait_op(Op::Request);
    assert_eq!(req.hdr.dst_port, 53);
    d.op(Op::Rst, 53, req.hdr.src_port);
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn in_process_connect_timeout_resets_the_guest() {
    let mut d = Driver::new();
    let host = d.dev.host();
    // Nobody pumps the device: the request is never even seen.
    let e = host.connect(52, Duration::from_millis(1)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    // The device picks it up later, the caller is gone: REQUEST then RST.
    let req = d.wait_op(Op::Request);
    let rst = d.wait_op(Op::Rst);
    assert_eq!(rst.hdr.src_port, req.hdr.src_port);
    assert_eq!(d.dev.stats().connections, 0);
}

// ------------------------------------------------------------------------------ credit

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(80);
    d.buf_alloc = 1000;
    d.guest_connect(6000, 80);
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(&[5u8; 5000]).unwrap();
    let mut got = 0;
    let mut credit_requests = 0;
    for p in d.drain() {
        match p.op() {
            Some(Op::Rw) => got += p.data.len(),
            Some(Op::CreditRequest) => credit_requests += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 1000, "exactly the advertised buffer");
    assert_eq!(credit_requests, 1);
    // Out of credit: the peer's data must not make the loop spin.
    assert!(!d.wait_ready(Duration::from_millis(20)));
    assert!(!d.dev.host_event(0, HostInterest::READABLE));
    // The guest consumed it all (fwd_cnt tracked by the driver) and says so.
    d.op(Op::CreditUpdate, 6000, 80);
    let more: usize = d
        .drain()
        .iter()
        .filter(|p| p.op() == Some(Op::Rw))
        .map(|p| p.data.len())
        .sum();
    assert_eq!(more, 1000);
    // A CREDIT_REQUEST from the guest is answered with our credit (after the data its
    // fwd_cnt made room for).
    d.op(Op::CreditRequest, 6000, 80);
    let got = d.drain();
    let upd = got.iter().find(|p| p.op() == Some(Op::CreditUpdate));
    assert_eq!(upd.expect("no CREDIT_UPDATE").hdr.buf_alloc, BUF_ALLOC);
}

#[test]
fn guest_to_host_is_bounded_by_buf_alloc_and_credit_updates_follow() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(81);
    d.guest_connect(6001, 81);
    let (mut peer, _) = listener.accept().unwrap();
    // The peer does not read: the socket buffer fills, then ours, up to BUF_ALLOC in all
    // beyond what the socket took. Honour credit as a driver would: track fwd_cnt from
    // CREDIT_UPDATEs.
    let chunk = vec![9u8; 16 * 1024];
    let mut sent: u64 = 0;
    for _ in 0..200 {
        d.rw(6001, 81, &chunk);
        sent += chunk.len() as u64;
        if sent > u64::from(BUF_ALLOC) + (4 << 20) {
            break;
        }
        let stats = d.dev.stats();
        if stats.credit_violations > 0 {
            break;
        }
    }
    // Beyond credit the connection was reset (the driver above ignored credit on purpose).
    assert_eq!(d.dev.stats().credit_violations, 1);
    let rst = d.drain().into_iter().find(|p| p.op() == Some(Op::Rst));
    assert!(rst.is_some(), "credit violation not reset");
    assert_eof_after_data(&mut peer);

    // Honest driver: stops at its credit, gets CREDIT_UPDATEs as the peer drains.
    let mut d = Driver::with_uds();
    let listener = d.port_listener(82);
    d.guest_connect(6002, 82);
    let (mut peer, _) = listener.accept().unwrap();
    let total: u64 = 4 << 20;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        while n < total {
            let r = peer.read(&mut buf).unwrap();
            assert!(r > 0);
            assert!(buf[..r].iter().all(|&b| b == 9));
            n += r as u64;
        }
        n
    });
    let mut peer_fwd: u32 = 0;
    let mut sent: u64 = 0;
    let deadline = Instant::now() + PATIENCE;
    while sent < total {
        let in_flight = (sent as u32).wrapping_sub(peer_fwd);
        let credit = BUF_ALLOC - in_flight;
        if credit as usize >= chunk.len() {
            d.rw(6002, 82, &chunk);
            sent += chunk.len() as u64;
        } else {
            assert!(Instant::now() < deadline, "no credit update came");
            d.wait_ready(Duration::from_millis(50));
            d.pump();
        }
        while let Some(p) = d.recv() {
            assert!(
                matches!(p.op(), Some(Op::CreditUpdate) | Some(Op::Rw)),
                "{p:?}"
            );
            peer_fwd = p.hdr.fwd_cnt;
            assert_eq!(p.hdr.buf_alloc, BUF_ALLOC);
        }
    }
    // Keep serving until the peer has everything (the tail may still be buffered).
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "peer never got all data");
        d.wait_ready(Duration::from_millis(50));
        d.pump();
        while d.recv().is_some() {}
    }
    assert_eq!(reader.join().unwrap(), total);
    assert_eq!(d.dev.stats().credit_violations, 0);
    assert_eq!(d.dev.stats().bytes_from_guest, total);
}

fn assert_eof_after_data(s: &mut UnixStream) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{e}"),
        }
    }
}

// ------------------------------------------------------------------------------ close

#[test]
fn half_close_both_ways_then_clean_disconnect() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(90);
    d.guest_connect(7000, 90);
    let (mut peer, _) = listener.accept().unwrap();
    d.rw(7000, 90, b"last words");
    // Guest stops sending: the peer reads the data, then end-of-file ...
    d.shutdown(7000, 90, VSOCK_SHUTDOWN_F_SEND);
    assert_eq!(read_exact_timeout(&mut peer, 10), b"last words");
    assert_eof(&mut peer);
    // ... and can still send to the guest.
    peer.write_all(b"still here").unwrap();
    assert_eq!(d.wait_op(Op::Rw).data, b"still here");
    // Peer stops sending: SHUTDOWN(SEND) reaches the guest after the data.
    peer.write_all(b"bye").unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut data = Vec::new();
    let sd = loop {
        let p = d.wait_pkt();
        match p.op() {
            Some(Op::Rw) => data.extend_from_slice(&p.data),
            Some(Op::Shutdown) => break p,
            Some(Op::CreditUpdate) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(data, b"bye");
    assert_ne!(sd.hdr.flags & VSOCK_SHUTDOWN_F_SEND, 0);
    // Guest done both ways: RST answers, the connection is gone.
    d.shutdown(7000, 90, VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE);
    let rst = d.wait_op(Op::Rst);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (90, 7000));
    assert_eq!(d.dev.stats().connections, 0);
}

#[test]
fn peer_disconnect_is_reported_and_guest_rst_cleans_up() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(91);
    d.guest_connect(7001, 91);
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(b"parting gift").unwrap();
    drop(peer);
    let mut data = Vec::new();
    let mut flags = 0;
    while flags != VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RECEIVE {
        let p = d.wait_pkt();
        match p.op() {
            Some(Op::Rw) => data.extend_from_slice(&p.data),
            Some(Op::Shutdown) => flags |= p.hdr.flags,
            Some(Op::CreditUpdate) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(data, b"parting gift");
    // Nothing else to report: no spinning on the hung-up socket.
    assert!(d.drain().is_empty());
    assert!(!d.wait_ready(Duration::from_millis(20)));
    d.op(Op::Rst, 7001, 91);
    assert_eq!(d.dev.stats().connections, 0);
    // Data to the closed connection: RST.
    d.rw(7001, 91, b"x");
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
}

#[test]
fn guest_rst_closes_the_unix_stream() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(92);
    d.guest_connect(7002, 92);
    let (mut peer, _) = listener.accept().unwrap();
    d.op(Op::Rst, 7002, 92);
    assert_eof(&mut peer);
    assert_eq!(d.dev.stats().connections, 0);
}

// ------------------------------------------------------------------------------ scale, reset

#[test]
fn hundreds_of_concurrent_connections() {
    const N: u32 = 300;
    let mut d = Driver::with_uds();
    let listener = d.port_listener(100);
    let mut peers = Vec::new();
    for i in 0..N {
        d.guest_connect(10_000 + i, 100);
        peers.push(listener.accept().unwrap().0);
    }
    assert_eq!(d.dev.stats().connections, u64::from(N));
    // Host-initiated ones too, through the CONNECT protocol.
    // (One at a time: the listener's backlog is finite and nobody else accepts.)
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = UnixStream::connect(d.uds()).unwrap();
        c.write_all(b"CONNECT 200\n").unwrap();
        clients.push(c);
        let p = d.wait_op(Op::Request);
        d.op(Op::Response, 200, p.hdr.src_port);
    }
    assert_eq!(d.dev.stats().connections, 2 * u64::from(N));
    // Every guest→host connection carries its own data.
    for i in 0..N {
        d.rw(10_000 + i, 100, &i.to_le_bytes());
    }
    for (i, p) in peers.iter_mut().enumerate() {
        assert_eq!(read_exact_timeout(p, 4), (i as u32).to_le_bytes());
    }
    // Every client got OK and its data reaches the right guest port.
    let mut by_port = HashMap::new();
    for c in clients.iter_mut() {
        let mut line = Vec::new();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            c.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        let line = String::from_utf8(line).unwrap();
        let port: u32 = line.trim().strip_prefix("OK ").unwrap().parse().unwrap();
        c.write_all(&port.to_le_bytes()).unwrap();
        by_port.insert(port, ());
    }
    assert_eq!(by_port.len(), N as usize);
    let mut seen = 0;
    while seen < N {
        let p = d.wait_op(Op::Rw);
        assert_eq!(p.data, p.hdr.src_port.to_le_bytes());
        assert!(by_port.remove(&p.hdr.src_port).is_some());
        seen += 1;
    }
}

#[test]
fn reset_closes_open_connections() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(110);
    let host = d.dev.host();
    let api_listener = host.listen(111).unwrap();
    d.guest_connect(1, 110);
    d.guest_connect(2, 111);
    let (mut a, _) = listener.accept().unwrap();
    let (mut b, _) = api_listener.accept_timeout(PATIENCE).unwrap();
    let mut c = UnixStream::connect(d.uds()).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    let req = d.wait_op(Op::Request);
    d.op(Op::Response, 5, req.hdr.src_port);
    assert_eq!(d.dev.stats().connections, 3);
    // A half-written CONNECT line and an in-process connect waiting for the guest.
    let mut half = UnixStream::connect(d.uds()).unwrap();
    half.write_all(b"CONN").unwrap();
    let waiter = std::thread::spawn({
        let host = host.clone();
        move || host.connect(6, PATIENCE)
    });
    d.wait_op(Op::Request);

    d.dev.reset();
    assert_eq!(d.dev.stats().connections, 0);
    assert_eof(&mut a);
    assert_eof(&mut b);
    let mut ok = Vec::new();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.read_to_end(&mut ok).unwrap();
    assert!(String::from_utf8(ok).unwrap().starts_with("OK "));
    assert_eof(&mut half);
    let e = waiter.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

    // After re-activation the old connection is unknown; new ones work, listeners remain.
    d.activate();
    d.rw(1, 110, b"stale");
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
    d.guest_connect(3, 111);
    assert_eq!(api_listener.accept_timeout(PATIENCE).unwrap().1, 3);
}

// ------------------------------------------------------------------------------ hostile guest

#[test]
fn hostile_packets_are_dropped_or_reset() {
    let mut d = Driver::with_uds();
    let listener = d.port_listener(120);
    d.guest_connect(8000, 120);
    let (mut peer, _) = listener.accept().unwrap();
    let base = d.dev.stats();

    // Spoofed source CID, wrong destination CID: dropped silently.
    let mut h = d.hdr(Op::Request, 8001, 120);
    h.src_cid = 4;
    d.send(h, &[]);
    let mut h = d.hdr(Op::Request, 8001, 120);
    h.dst_cid = 7;
    d.send(h, &[]);
    // Unknown op on a live connection: dropped.
    let mut h = d.hdr(Op::Rw, 8000, 120);
    h.op = 99;
    d.send(h, &[]);
    assert!(d.drain().is_empty());
    assert_eq!(d.dev.stats().dropped_packets, base.dropped_packets + 3);
    assert_eq!(d.dev.stats().connections, 1);

    // Unsupported type: RST.
    let mut h = d.hdr(Op::Request, 8002, 120);
    h.type_ = 2;
    d.send(h, &[]);
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));

    // Header shorter than 44 bytes; a chain with only writable buffers.
    d.write_desc(1, 0, TX_DATA, 20, 0, 0);
    d.publish(1, 0);
    d.write_desc(1, 0, TX_DATA, 64, VIRTQ_DESC_F_WRITE, 0);
    d.publish(1, 0);
    d.notify(1);
    assert_eq!(d.dev.stats().malformed_chains, base.malformed_chains + 2);

    // len larger than the chain carries, or than MAX_PKT_PAYLOAD: the connection is reset
    // (its stream would be corrupt).
    let mut h = d.hdr(Op::Rw, 8000, 120);
    h.len = 1000;
    d.send(h, b"short");
    let rst = d.wait_pkt();
    assert_eq!(rst.op(), Some(Op::Rst));
    assert_eof(&mut peer);
    assert_eq!(d.dev.stats().connections, 0);
    let mut h = d.hdr(Op::Rw, 8003, 120);
    h.len = MAX_PKT_PAYLOAD + 1;
    d.send(h, &[]);
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));

    // Unexpected RESPONSE on an established connection: reset.
    d.guest_connect(8004, 120);
    let (mut peer, _) = listener.accept().unwrap();
    d.op(Op::Response, 8004, 120);
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
    assert_eof(&mut peer);

    // Descriptor errors: a chain pointing outside guest memory is returned with length 0.
    d.write_desc(1, 0, MEM_SIZE as u64 + 0x1000, 64, 0, 0);
    d.publish(1, 0);
    d.notify(1);
    let used: u16 = d.mem.read_obj(GuestAddress(qbase(1) + 0x2002)).unwrap();
    assert_eq!(used, d.avail[1]);
    assert_eq!(d.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn rx_buffers_too_small_for_a_header_are_returned_empty() {
    let mut d = Driver::new();
    d.dev.reset();
    d.rx_payload = 0;
    // Post just one 10-byte buffer and make the device answer something (an RST).
    let queues = d.queues();
    d.mem
        .write_slice(&vec![0u8; 0x3_0000], GuestAddress(qbase(0)))
        .unwrap();
    d.avail = [0; 3];
    d.used_seen = [0; 3];
    d.dev
        .activate(ActivateContext {
            mem: d.mem.clone(),
            queues,
            features: d.dev.device_features(),
            interrupt: d.irq.clone(),
        })
        .unwrap();
    d.write_desc(0, 0, RX_DATA, 10, VIRTQ_DESC_F_WRITE, 0);
    d.publish(0, 0);
    d.rw(1, 2, b"x");
    let used: u16 = d.mem.read_obj(GuestAddress(qbase(0) + 0x2002)).unwrap();
    assert_eq!(used, 1);
    let len: u32 = d.mem.read_obj(GuestAddress(qbase(0) + 0x2004 + 4)).unwrap();
    assert_eq!(len, 0);
    assert_eq!(d.dev.stats().malformed_chains, 1);
}

#[test]
fn floods_stay_bounded() {
    let mut d = Driver::new();
    // The guest posts no rx buffers and sends thousands of packets to unknown ports: the
    // RSTs owed are capped.
    d.dev.reset();
    let queues = d.queues();
    d.avail = [0; 3];
    d.used_seen = [0; 3];
    d.mem
        .write_slice(&vec![0u8; 0x3_0000], GuestAddress(qbase(0)))
        .unwrap();
    d.dev
        .activate(ActivateContext {
            mem: d.mem.clone(),
            queues,
            features: d.dev.device_features(),
            interrupt: d.irq.clone(),
        })
        .unwrap();
    for i in 0..(MAX_ORPHAN_RST as u32 + 500) {
        let mut h = d.hdr(Op::Rw, i, 1);
        h.len = 1;
        d.queue_tx(h, b"z");
        if i % 100 == 0 {
            d.notify(1);
        }
    }
    d.notify(1);
    let s = d.dev.stats();
    assert_eq!(s.rst_dropped, 500);
    // Now with buffers: exactly the capped number arrives.
    for _ in 0..SIZE {
        d.post_rx();
    }
    d.notify(0);
    let mut n = 0;
    while d.recv().is_some() {
        n += 1;
    }
    assert_eq!(n, MAX_ORPHAN_RST);

    // Credit flood on a live connection whose peer does not read: reset, buffer bounded.
    let mut d = Driver::new();
    let host = d.dev.host();
    let l = host.listen(5).unwrap();
    d.guest_connect(9, 5);
    let (_peer, _) = l.accept_timeout(PATIENCE).unwrap();
    let chunk = vec![1u8; MAX_PKT_PAYLOAD as usize];
    for _ in 0..64 {
        d.rw(9, 5, &chunk);
    }
    assert_eq!(d.dev.stats().credit_violations, 1);
    assert_eq!(d.dev.stats().connections, 0);
}

#[test]
fn avail_index_jump_needs_reset() {
    let mut d = Driver::new();
    d.mem
        .write_obj(
            d.avail[1].wrapping_add(SIZE + 1).to_le(),
            GuestAddress(qbase(1) + 0x1000 + 2),
        )
        .unwrap();
    assert!(!d.dev.queue_notify(1));
    assert_eq!(d.irq.needs_reset.load(Ordering::SeqCst), 1);
    assert!(d.dev.needs_reset());
    // Ignored until reset; then fine again.
    assert!(!d.dev.queue_notify(1));
    d.dev.reset();
    d.activate();
    d.rw(1, 2, b"x");
    assert_eq!(d.wait_pkt().op(), Some(Op::Rst));
}

#[test]
fn bounded_work_per_notification() {
    let mut d = Driver::new();
    // A full ring (the most a driver can have pending) hits the per-call budget exactly.
    assert_eq!(MAX_PACKETS_PER_CALL, usize::from(SIZE));
    for i in 0..u32::from(SIZE) {
        let h = d.hdr(Op::Rst, i, 1); // RSTs for unknown connections: no answer
        d.queue_tx(h, &[]);
    }
    assert!(d.dev.queue_notify(1), "stopped at the budget: call again");
    assert!(!d.dev.queue_notify(1));
    assert_eq!(d.dev.stats().tx_packets, u64::from(SIZE));
}

//! virtio-net host-side throughput with a simulated driver, through a real TAP device.
//!
//! A non-persistent TAP (`smolvm%d`, 10.213.9.1/24, MTU 65521, IPv6 off) is created for the
//! run and vanishes with it. The driver lays out rings and frames in guest memory the way
//! Linux's virtio_net does and the device is driven through `VirtioDevice` calls:
//!
//! - `tx/<size>`: the driver posts a batch of frames (256 × 64 B / 1500 B in one descriptor
//!   each, header included; 32 × 64 KiB TCPv4 TSO frames with a GSO header, as a header
//!   descriptor plus 16 page-sized pieces through an indirect table), one `queue_notify`
//!   sends them all to the TAP (`writev` straight from guest memory). The frames are addressed
//!   to another MAC, so the host stack drops them on arrival.
//! - `rx/<size>`: the host injects a batch of frames into the TAP through an `AF_PACKET`
//!   socket bound to it (this send cost is part of the measurement), the driver posts one
//!   receive chain per frame, and the device's TAP-readable handler reads them into guest
//!   buffers (`MRG_RXBUF` negotiated). 64 KiB receive frames are plain jumbo frames (MTU
//!   65521, so 65535-byte frames): `AF_PACKET` cannot inject GSO frames without `PACKET_VNET_HDR`.
//!
//! criterion reports bytes/s (frame bytes, virtio header excluded); after the criterion run a
//! short summary prints Gbit/s and packets/s for each case.
//!
//! When no TAP can be made (no CAP_NET_ADMIN or /dev/net/tun), the bench says so and measures
//! an `AF_UNIX` datagram socket pair backend instead, labelled `pair-*`.
//!
//! Run with `cargo bench --bench virtio_net` (needs no KVM).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress};

use smolvm::devices::virtio::net::{
    Net, NetBackend, NetConfig, Tap, TapConfig, TxFrame, TOKEN_BACKEND, TX_QUEUE,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use smolvm::devices::virtio::queue::{
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use smolvm::devices::virtio::{
    ActivateContext, HostInterest, Queue, VirtioDevice, VirtioInterrupt,
};
use smolvm::memory::{self, GuestMemory};

const SIZE: u16 = 256;
const RINGS: [u64; 2] = [0x10_0000, 0x20_0000]; // rx, tx: desc, +0x2000 avail, +0x3000 used
const INDIRECT: u64 = 0x30_0000;
const DATA: u64 = 0x100_0000;
const MEM: usize = 128 << 20;
const ETHERTYPE: u16 = 0x88b5;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

/// Fallback backend: one datagram per frame over a socket pair.
struct Pair(UnixDatagram);
impl NetBackend for Pair {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        self.0.send(&frame.to_vec()).map(|_| ())
    }
    fn fd(&self) -> Option<i32> {
        Some(self.0.as_raw_fd())
    }
    fn set_offloads(&mut self, _guest_features: u64) -> io::Result<()> {
        Ok(())
    }
}

/// The far side of the backend, where the bench injects received frames and drains sent ones.
enum Peer {
    Packet(OwnedFd),
    Pair(UnixDatagram),
}

impl Peer {
    fn inject(&self, frame: &[u8]) {
        let r = match self {
            Peer::Packet(fd) => {
                // SAFETY: `frame` is valid for its length for the duration of the call.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
            Peer::Pair(s) => {
                let mut v = vec![0u8; 12];
                v.extend_from_slice(frame);
                s.send(&v).map(|_| ())
            }
        };
        r.expect("injecting a frame");
    }

    /// Empties what the device sent (socket pair only: the TAP's host side consumes itself).
    fn drain(&self) {
        if let Peer::Pair(s) = self {
            let mut buf = vec![0u8; 70000];
            while s.recv(&mut buf).is_ok() {}
        }
    }
}

fn write_desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
        .unwrap();
}

/// An Ethernet frame of `len` bytes to a MAC the host does not own; IPv4/TCP headers for TSO.
fn eth_frame(len: usize, tso: bool) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    if tso {
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((len - 14).min(65535) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6; // TCP
        ip[12..16].copy_from_slice(&[10, 213, 9, 2]);
        ip[16..20].copy_from_slice(&[10, 213, 9, 3]);
        let tcp = &mut f[34..54];
        tcp[12] = 5 << 4;
        tcp[13] = 0x10; // ACK
    } else {
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    }
    for (i, b) in f.iter_mut().enumerate().skip(54) {
        *b = i as u8;
    }
    f
}

struct Driver<B: NetBackend> {
    mem: GuestMemory,
    dev: Net<B>,
    avail: [u16; 2],
}

impl<B: NetBackend> Driver<B> {
    fn new(backend: B) -> Self {
        let mem = memory::create(&[(GuestAddress(0), MEM)]).unwrap();
        let mut dev = Net::new(backend, NetConfig::default()).unwrap();
        let queues = RINGS
            .iter()
            .map(|&base| {
                let mut q = Queue::new(SIZE);
                q.desc_table = GuestAddress(base);
                q.avail_ring = GuestAddress(base + 0x2000);
                q.used_ring = GuestAddress(base + 0x3000);
                q.event_idx = true;
                q.indirect = true;
                q.ready = true;
                assert!(q.is_valid(&mem));
                q
            })
            .collect();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            features: dev.device_features(),
            interrupt: Arc::new(NoIrq),
        })
        .unwrap();
        Driver {
            mem,
            dev,
            avail: [0, 0],
        }
    }

    fn used(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q] + 0x3002)).unwrap()
    }

    /// Makes heads `0..n` available on queue `q` again.
    fn publish(&mut self, q: usize, n: u16) {
        let ring = RINGS[q] + 0x2000;
        for i in 0..n {
            let slot = u64::from(self.avail[q].wrapping_add(i) % SIZE);
            self.mem
                .write_obj(i.to_le(), GuestAddress(ring + 4 + 2 * slot))
                .unwrap();
        }
        self.avail[q] = self.avail[q].wrapping_add(n);
        self.mem
            .write_obj(self.avail[q].to_le(), GuestAddress(ring + 2))
            .unwrap();
    }

    /// `n` transmit chains of header + `frame`: one descriptor each, or (tso) an indirect
    /// table of the header and 4 KiB pieces.
    fn setup_tx(&mut self, n: u16, frame: &[u8], tso: bool) {
        let mut hdr = [0u8; 12];
        if tso {
            hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            hdr[1] = VIRTIO_NET_HDR_GSO_TCPV4;
            hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
            hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
            hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
            hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        let stride = (12 + frame.len() as u64 + 4095) & !4095;
        for i in 0..n {
            let base = DATA + u64::from(i) * stride;
            self.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
            self.mem
                .write_slice(frame, GuestAddress(base + 12))
                .unwrap();
            if tso {
                let table = INDIRECT + u64::from(i) * 0x400;
                write_desc(&self.mem, table, 0, base, 12, VIRTQ_DESC_F_NEXT, 1);
                let mut k = 1u16;
                let mut off = 0u64;
                while off < frame.len() as u64 {
                    let len = (frame.len() as u64 - off).min(4096);
                    let last = off + len == frame.len() as u64;
                    let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    write_desc(
                        &self.mem,
                        table,
                        k,
                        base + 12 + off,
                        len as u32,
                        flags,
                        k + 1,
                    );
                    k += 1;
                    off += len;
                }
                write_desc(
                    &self.mem,
                    RINGS[1],
                    i,
                    table,
                    16 * u32::from(k),
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                );
            } else {
                write_desc(&self.mem, RINGS[1], i, base, 12 + frame.len() as u32, 0, 0);
            }
        }
    }

    fn tx_round(&mut self, n: u16, peer: &Peer) {
        self.publish(1, n);
        let want = self.avail[1];
        while self.dev.queue_notify(TX_QUEUE) {}
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used(1) != want {
            // A full socket pair: empty it and report the backend writable.
            peer.drain();
            self.dev.host_event(TOKEN_BACKEND, HostInterest::WRITABLE);
            assert!(
                Instant::now() < deadline,
                "transmit chains not all completed"
            );
        }
        peer.drain();
    }

    /// `n` receive chains of one `len`-byte buffer each.
    fn setup_rx(&mut self, n: u16, len: u32) {
        let stride = (u64::from(len) + 4095) & !4095;
        for i in 0..n {
            let addr = DATA + 0x400_0000 + u64::from(i) * stride;
            write_desc(&self.mem, RINGS[0], i, addr, len, VIRTQ_DESC_F_WRITE, 0);
        }
    }

    fn rx_round(&mut self, n: u16, peer: &Peer, frame: &[u8]) {
        for _ in 0..n {
            peer.inject(frame);
        }
        let start = self.used(0);
        self.publish(0, n);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used(0).wrapping_sub(start) < n {
            self.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
            assert!(Instant::now() < deadline, "frames never arrived");
        }
    }
}

fn packet_socket(ifindex: u32) -> OwnedFd {
    // SAFETY: plain socket(2) call; result checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
    let big: libc::c_int = 64 << 20;
    // SAFETY: SO_SNDBUFFORCE reads one int through the pointer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&big as *const libc::c_int).cast(),
            4,
        )
    };
    fd
}

struct Case {
    name: &'static str,
    frame_len: usize,
    batch: u16,
    tso: bool,
}

const CASES: [Case; 3] = [
    Case {
        name: "64B",
        frame_len: 64,
        batch: 256,
        tso: false,
    },
    Case {
        name: "1500B",
        frame_len: 1514,
        batch: 256,
        tso: false,
    },
    Case {
        name: "64KiB",
        frame_len: 65536,
        batch: 32,
        tso: true,
    },
];

fn run<B: NetBackend>(c: &mut Criterion, label: &str, mk: &mut dyn FnMut() -> (B, Peer)) {
    let mut summary = Vec::new();
    let mut g = c.benchmark_group("virtio_net");
    for case in &CASES {
        let frame = eth_frame(case.frame_len, case.tso);
        let bytes = case.frame_len as u64 * u64::from(case.batch);

        let (b, peer) = mk();
        let mut d = Driver::new(b);
        d.setup_tx(case.batch, &frame, case.tso);
        g.throughput(Throughput::Bytes(bytes));
        let id = format!("{label}tx/{}", case.name);
        g.bench_function(&id, |bn| bn.iter(|| d.tx_round(case.batch, &peer)));
        let t = Instant::now();
        let mut rounds = 0u64;
        while t.elapsed() < Duration::from_millis(500) {
            d.tx_round(case.batch, &peer);
            rounds += 1;
        }
        summary.push((
            id,
            rounds * bytes,
            rounds * u64::from(case.batch),
            t.elapsed(),
        ));
        let s = d.dev.stats();
        assert_eq!(s.tx_dropped(), 0, "{s:?}");
        drop(d);

        let (b, peer) = mk();
        let mut d = Driver::new(b);
        // Without GSO on the injection side, the big receive frame is a jumbo frame.
        let rx_frame = eth_frame(case.frame_len.min(65535), false);
        let rx_bytes = rx_frame.len() as u64 * u64::from(case.batch);
        g.throughput(Throughput::Bytes(rx_bytes));
        d.setup_rx(case.batch, (12 + case.frame_len as u32).max(2048));
        let id = format!("{label}rx/{}", case.name);
        g.bench_function(&id, |bn| {
            bn.iter(|| d.rx_round(case.batch, &peer, &rx_frame))
        });
        let t = Instant::now();
        let mut rounds = 0u64;
        while t.elapsed() < Duration::from_millis(500) {
            d.rx_round(case.batch, &peer, &rx_frame);
            rounds += 1;
        }
        summary.push((
            id,
            rounds * bytes,
            rounds * u64::from(case.batch),
            t.elapsed(),
        ));
    }
    g.finish();
    println!("\nvirtio_net summary ({label}backend; frame bytes, virtio header excluded):");
    for (id, bytes, pkts, el) in summary {
        let s = el.as_secs_f64();
        println!(
            "  {id:<16} {:>8.2} Gbit/s {:>10.0} packets/s",
            bytes as f64 * 8.0 / s / 1e9,
            pkts as f64 / s
        );
    }
}

fn disable_ipv6(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
}

fn bench(c: &mut Criterion) {
    let cfg = TapConfig {
        name: None,
        ipv4: Some((std::net::Ipv4Addr::new(10, 213, 9, 1), 24)),
        mtu: Some(65521), // a TAP's largest: 65535 minus the Ethernet header
    };
    match Tap::create(&cfg) {
        Ok(probe) => {
            drop(probe);
            let mut mk = || {
                let tap = Tap::create(&cfg).expect("creating the bench TAP");
                disable_ipv6(tap.name());
                let sock = packet_socket(tap.if_index().unwrap());
                // Empty what the kernel queued before IPv6 was turned off.
                let mut buf = vec![0u8; 70000];
                let mut t = tap;
                while t.read_frame(&mut buf).is_ok() {}
                (t, Peer::Packet(sock))
            };
            run(c, "", &mut mk);
        }
        Err(e) => {
            eprintln!("virtio_net bench: no TAP ({e}); measuring an AF_UNIX socket pair backend instead (pair-*)");
            let mut mk = || {
                let (a, b) = UnixDatagram::pair().unwrap();
                a.set_nonblocking(true).unwrap();
                b.set_nonblocking(true).unwrap();
                (Pair(a), Peer::Pair(b))
            };
            run(c, "pair-", &mut mk);
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

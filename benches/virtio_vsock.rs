//! virtio-vsock throughput and latency through the device and its muxer, with a simulated
//! driver laying out packets in guest memory the way Linux's virtio_vsock does and a host
//! peer on the other end of an in-process connection (`VsockHost::listen`: a socketpair the
//! muxer serves exactly like a Unix-socket connection).
//!
//! - `g2h_64k`: guest→host, 64 KiB RW packets, honouring the device's credit (256 KiB
//!   `buf_alloc`), a host thread draining the stream (criterion's bytes/s; 1 MiB per
//!   iteration).
//! - `h2g_64k`: host→guest, a host thread writing 64 KiB chunks, the driver posting 64 KiB rx
//!   buffers and returning credit with CREDIT_UPDATE (1 MiB per iteration).
//! - `rtt_64b`: a 64-byte RW from the guest, echoed by a host thread, back in the rx queue;
//!   the driver side sleeps in `poll(2)` on the muxer's epoll as the device event loop would.
//!   `rtt_64b_spin`: the same with the driver side spinning on `poll(2)` with no timeout.
//!
//! Run with `cargo bench --bench virtio_vsock`. Needs no KVM.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress};

use smolvm::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use smolvm::devices::virtio::vsock::packet::{
    Op, PacketHeader, HDR_LEN, VSOCK_HOST_CID, VSOCK_TYPE_STREAM,
};
use smolvm::devices::virtio::vsock::{Vsock, VsockConfig, BUF_ALLOC};
use smolvm::devices::virtio::{
    ActivateContext, HostInterest, Queue, VirtioDevice, VirtioInterrupt,
};
use smolvm::memory::{self, GuestMemory};

const CID: u64 = 3;
const SIZE: u16 = 256;
const CHUNK: usize = 64 * 1024;
const TX_DATA: u64 = 0x10_0000;
const RX_DATA: u64 = 0x100_0000;
const RX_SLOT: u64 = 0x1_1000;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 80;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

fn qbase(q: u64) -> u64 {
    0x1_0000 * (q + 1)
}

struct Driver {
    mem: GuestMemory,
    dev: Vsock,
    avail: [u16; 2],
    used_seen: [u16; 2],
    tx_n: u16,
    /// Bytes of RW payload the guest consumed (its fwd_cnt).
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    epoll_fd: i32,
}

impl Driver {
    fn new(rx_payload: u32) -> Driver {
        let mem = memory::create(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut dev = Vsock::new(VsockConfig::new(CID)).unwrap();
        let queues = (0..3)
            .map(|i| {
                let mut q = Queue::new(SIZE);
                q.desc_table = GuestAddress(qbase(i));
                q.avail_ring = GuestAddress(qbase(i) + 0x1000);
                q.used_ring = GuestAddress(qbase(i) + 0x2000);
                q.event_idx = true;
                q.ready = true;
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
        let epoll_fd = dev.host_events()[0].fd;
        let mut d = Driver {
            mem,
            dev,
            avail: [0; 2],
            used_seen: [0; 2],
            tx_n: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            epoll_fd,
        };
        for i in 0..SIZE {
            let addr = RX_DATA + u64::from(i) * RX_SLOT;
            d.desc(
                0,
                i,
                addr,
                HDR_LEN as u32 + rx_payload,
                VIRTQ_DESC_F_WRITE,
                0,
            );
            d.publish(0, i);
        }
        d.dev.queue_notify(0);
        d
    }

    fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(qbase(q) + 16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let ring = qbase(q as u64) + 0x1000;
        let slot = u64::from(self.avail[q] % SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(ring + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q].to_le(), GuestAddress(ring + 2))
            .unwrap();
    }

    fn hdr(&self, op: Op, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: GUEST_PORT,
            dst_port: HOST_PORT,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Queues a tx packet whose payload already sits in the slot's buffer.
    fn queue_tx(&mut self, hdr: PacketHeader) {
        let slot = self.tx_n % (SIZE / 2);
        self.tx_n = self.tx_n.wrapping_add(1);
        let addr = TX_DATA + u64::from(slot) * 0x200;
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(addr))
            .unwrap();
        let (h, p) = (2 * slot, 2 * slot + 1);
        if hdr.len == 0 {
            self.desc(1, h, addr, HDR_LEN as u32, 0, 0);
        } else {
            // Payload buffers: one shared 64 KiB region (contents do not matter here).
            self.desc(1, h, addr, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, p);
            self.desc(1, p, 0x80_0000, hdr.len, 0, 0);
        }
        self.publish(1, h);
    }

    fn send(&mut self, hdr: PacketHeader) {
        self.queue_tx(hdr);
        while self.dev.queue_notify(1) {}
    }

    /// Takes the next used rx buffer: (header, payload length); reposts it (not notified).
    fn recv(&mut self) -> Option<PacketHeader> {
        let used: u16 = self.mem.read_obj(GuestAddress(qbase(0) + 0x2002)).unwrap();
        if used == self.used_seen[0] {
            return None;
        }
        let slot = u64::from(self.used_seen[0] % SIZE);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(qbase(0) + 0x2004 + 8 * slot))
            .unwrap();
        self.used_seen[0] = self.used_seen[0].wrapping_add(1);
        let mut hb = [0u8; HDR_LEN];
        self.mem
            .read_slice(&mut hb, GuestAddress(RX_DATA + u64::from(id) * RX_SLOT))
            .unwrap();
        let h = PacketHeader::parse(&hb);
        if h.op == Op::Rw as u16 {
            self.fwd_cnt = self.fwd_cnt.wrapping_add(h.len);
        }
        self.publish(0, id as u16);
        Some(h)
    }

    /// Blocks until the muxer has something, then serves it.
    fn wait_and_pump(&mut self) {
        self.poll_and_pump(100);
    }

    /// `poll(2)` on the muxer's epoll with `timeout_ms` (0: spin), then serves it.
    fn poll_and_pump(&mut self, timeout_ms: i32) {
        let mut pfd = libc::pollfd {
            fd: self.epoll_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        while self.dev.host_event(0, HostInterest::READABLE) {}
    }

    /// Connects guest port → host listener; returns the host end.
    fn connect(&mut self) -> std::os::unix::net::UnixStream {
        let host = self.dev.host();
        let l = host.listen(HOST_PORT).unwrap();
        let h = self.hdr(Op::Request, 0);
        self.send(h);
        let r = self.recv().expect("RESPONSE");
        assert_eq!(r.op, Op::Response as u16);
        self.dev.queue_notify(0);
        l.accept_timeout(Duration::from_secs(5)).unwrap().0
    }
}

fn g2h(c: &mut Criterion) {
    let mut d = Driver::new(4096);
    let mut peer = d.connect();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while peer.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let mut sent: u32 = 0;
    let mut peer_fwd: u32 = 0;
    let mut g = c.benchmark_group("virtio_vsock");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("g2h_64k", |b| {
        b.iter(|| {
            let mut done = 0;
            while done < 1 << 20 {
                let credit = BUF_ALLOC - sent.wrapping_sub(peer_fwd);
                if credit as usize >= CHUNK {
                    let h = d.hdr(Op::Rw, CHUNK as u32);
                    d.send(h);
                    sent = sent.wrapping_add(CHUNK as u32);
                    done += CHUNK;
                }
                let mut got = false;
                while let Some(h) = d.recv() {
                    peer_fwd = h.fwd_cnt;
                    got = true;
                }
                if got {
                    d.dev.queue_notify(0);
                } else if (BUF_ALLOC - sent.wrapping_sub(peer_fwd)) < CHUNK as u32 {
                    // No credit and no update yet: wait for the peer to drain.
                    d.wait_and_pump();
                }
            }
        })
    });
    g.finish();
}

fn h2g(c: &mut Criterion) {
    let mut d = Driver::new(CHUNK as u32);
    let mut peer = d.connect();
    std::thread::spawn(move || {
        let buf = vec![7u8; CHUNK];
        while peer.write_all(&buf).is_ok() {}
    });
    let mut g = c.benchmark_group("virtio_vsock");
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("h2g_64k", |b| {
        b.iter(|| {
            let mut got = 0usize;
            while got < 1 << 20 {
                let mut any = false;
                while let Some(h) = d.recv() {
                    got += h.len as usize;
                    any = true;
                }
                if d.fwd_cnt.wrapping_sub(d.fwd_cnt_sent) >= GUEST_BUF_ALLOC / 2 {
                    d.fwd_cnt_sent = d.fwd_cnt;
                    let h = d.hdr(Op::CreditUpdate, 0);
                    d.send(h);
                }
                if any {
                    while d.dev.queue_notify(0) {}
                } else {
                    d.wait_and_pump();
                }
            }
        })
    });
    g.finish();
}

fn rtt(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtio_vsock");
    g.throughput(Throughput::Elements(1));
    // Blocking: the device thread sleeps in poll(2) like the device event loop does.
    // Spinning: it polls without sleeping, leaving out its own wake-up.
    for (name, timeout_ms) in [("rtt_64b", 100), ("rtt_64b_spin", 0)] {
        let mut d = Driver::new(4096);
        let mut peer = d.connect();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while peer.read_exact(&mut buf).is_ok() {
                if peer.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        g.bench_function(name, |b| {
            b.iter(|| {
                let h = d.hdr(Op::Rw, 64);
                d.send(h);
                let mut back = 0;
                while back < 64 {
                    while let Some(h) = d.recv() {
                        back += h.len;
                    }
                    if back < 64 {
                        d.poll_and_pump(timeout_ms);
                    }
                }
                d.dev.queue_notify(0);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, g2h, h2g, rtt);
criterion_main!(benches);

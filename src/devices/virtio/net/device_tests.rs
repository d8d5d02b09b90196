//! Unit tests of the virtio-net device, driven by a simulated driver that lays out both rings,
//! descriptor tables and frames in guest memory by hand, over the in-memory backend; and TAP
//! tests (need root and /dev/net/tun; skipped loudly otherwise).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::device::check_tx_header_for_tests as check_tx_header;
use super::*;
use crate::devices::rate_limiter::{BucketConfig, ManualClock, RateLimit, RateLimiter};
use crate::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::{
    ActivateContext, ActivateError, HostInterest, Queue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_RING_EVENT_IDX,
};
use crate::memory::{self, GuestMemory};

const MEM_SIZE: usize = 32 << 20;
const DATA: u64 = 0x10_0000;

#[derive(Default)]
struct Irq {
    used: [AtomicU32; 2],
    needs_reset: AtomicU32,
}

impl VirtioInterrupt for Irq {
    fn signal_used_queue(&self, queue: u16) {
        self.used[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// One queue as the driver sees it.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

/// A buffer of a chain: guest address, length, device-writable.
type Buf = (u64, u32, bool);

struct Harness<B: NetBackend> {
    mem: GuestMemory,
    dev: Net<B>,
    irq: Arc<Irq>,
    rings: [Ring; 2],
    bump: u64,
}

fn ring(base: u64, size: u16) -> Ring {
    Ring {
        desc: base,
        avail: base + 0x2000,
        used: base + 0x3000,
        size,
        avail_idx: 0,
        used_seen: 0,
        next_desc: 0,
    }
}

fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// A recognisable frame of `len` bytes (Ethernet header included).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn all_features() -> u64 {
    Net::new(MemBackend::default(), NetConfig::default())
        .unwrap()
        .device_features()
}

impl Harness<MemBackend> {
    fn new(features: u64) -> Self {
        Self::with(MemBackend::default(), NetConfig::default(), features)
    }
}

impl<B: NetBackend> Harness<B> {
    fn with(backend: B, cfg: NetConfig, features: u64) -> Self {
        let mem = memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let size = cfg.queue_size;
        let mut h = Harness {
            mem,
            dev: Net::new(backend, cfg).unwrap(),
            irq: Arc::new(Irq::default()),
            rings: [ring(0x1_0000, size), ring(0x5_0000, size)],
            bump: DATA,
        };
        h.activate(features);
        h
    }

    fn activate(&mut self, features: u64) {
        self.mem
            .write_slice(&vec![0u8; 0x8_0000], GuestAddress(0x1_0000))
            .unwrap();
        let mut queues = Vec::new();
        for r in self.rings.iter_mut() {
            r.avail_idx = 0;
            r.used_seen = 0;
            r.next_desc = 0;
            let mut q = Queue::new(r.size);
            q.desc_table = GuestAddress(r.desc);
            q.avail_ring = GuestAddress(r.avail);
            q.used_ring = GuestAddress(r.used);
            q.indirect = true;
            q.event_idx = features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
            q.ready = true;
            assert!(q.is_valid(&self.mem));
            queues.push(q);
        }
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                features,
                interrupt: self.irq.clone(),
            })
            .unwrap();
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.bump + len > MEM_SIZE as u64 {
            self.bump = DATA;
        }
        let a = self.bump;
        self.bump += len.max(1);
        a
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    /// Makes a chain available on queue `q` (through an indirect table if asked).
    fn submit(&mut self, q: usize, bufs: &[Buf], indirect: bool) -> u16 {
        let flags = |k: usize, w: bool| {
            (if k + 1 < bufs.len() {
                VIRTQ_DESC_F_NEXT
            } else {
                0
            }) | if w { VIRTQ_DESC_F_WRITE } else { 0 }
        };
        let (desc, size, head) = (
            self.rings[q].desc,
            self.rings[q].size,
            self.rings[q].next_desc,
        );
        if indirect {
            let table = self.alloc(16 * bufs.len() as u64);
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                self.write_desc(table, k as u16, a, l, flags(k, w), k as u16 + 1);
            }
            self.write_desc(
                desc,
                head,
                table,
                16 * bufs.len() as u32,
                VIRTQ_DESC_F_INDIRECT,
                0,
            );
            self.rings[q].next_desc = (head + 1) % size;
        } else {
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % size;
                self.write_desc(desc, i, a, l, flags(k, w), (i + 1) % size);
            }
            self.rings[q].next_desc = (head + bufs.len() as u16) % size;
        }
        self.publish(q, head);
        head
    }

    fn publish(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = u64::from(r.avail_idx % r.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(r.avail + 4 + 2 * slot))
            .unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(r.avail_idx.to_le(), GuestAddress(r.avail + 2))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// New used elements of queue `q`.
    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let mut v = Vec::new();
        while self.used_idx(q) != self.rings[q].used_seen {
            let r = &mut self.rings[q];
            let a = r.used + 4 + 8 * u64::from(r.used_seen % r.size);
            r.used_seen = r.used_seen.wrapping_add(1);
            let id: u32 = self.mem.read_obj(GuestAddress(a)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(a + 4)).unwrap();
            v.push((id as u16, len));
        }
        v
    }

    /// Puts `bytes` in guest memory as pieces of the given sizes (the rest in one last piece).
    fn readable(&mut self, bytes: &[u8], pieces: &[usize]) -> Vec<Buf> {
        let mut out = Vec::new();
        let mut pos = 0;
        for &p in pieces.iter().chain(std::iter::once(&usize::MAX)) {
            let n = p.min(bytes.len() - pos);
            if n == 0 && pos == bytes.len() {
                break;
            }
            let a = self.alloc(n as u64);
            self.mem
                .write_slice(&bytes[pos..pos + n], GuestAddress(a))
                .unwrap();
            out.push((a, n as u32, false));
            pos += n;
        }
        out
    }

    /// Submits a transmit chain with `header ++ frame` in the given pieces.
    fn send(&mut self, header: &[u8], frame: &[u8], pieces: &[usize]) -> u16 {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        let bufs = self.readable(&bytes, pieces);
        self.submit(TX_QUEUE as usize, &bufs, false)
    }

    /// Posts a receive chain of writable buffers of these lengths; returns (head, addresses).
    fn post_rx(&mut self, lens: &[u32]) -> (u16, Vec<Buf>) {
        let bufs: Vec<Buf> = lens
            .iter()
            .map(|&l| {
                let a = self.alloc(u64::from(l));
                self.mem
                    .write_slice(&vec![0xee; l as usize], GuestAddress(a))
                    .unwrap();
                (a, l, true)
            })
            .collect();
        let head = self.submit(RX_QUEUE as usize, &bufs, false);
        (head, bufs)
    }

    /// The first `len` bytes a used receive chain holds.
    fn read_bufs(&self, bufs: &[Buf], len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(a, l, _) in bufs {
            let n = left.min(l as usize);
            let mut v = vec![0u8; n];
            self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
            out.extend(v);
            left -= n;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration and activation.

#[test]
fn config_space_holds_mac_status_and_pairs() {
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let net = Net::new(
        MemBackend::default(),
        NetConfig {
            mac: Some(mac),
            ..Default::default()
        },
    )
    .unwrap();
    let mut cfg = [0xffu8; 16];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(&cfg[10..], &[0; 6], "bytes past the config read as zero");
    let mut b = [0u8; 2];
    net.read_config(u64::MAX, &mut b); // no overflow panic
    assert_eq!(b, [0, 0]);
    assert_eq!(net.device_type(), crate::devices::virtio::DEVICE_ID_NET);
}

#[test]
fn random_macs_are_local_unicast_and_differ() {
    let a = Net::new(MemBackend::default(), NetConfig::default())
        .unwrap()
        .mac();
    let b = Net::new(MemBackend::default(), NetConfig::default())
        .unwrap()
        .mac();
    for m in [a, b] {
        assert_eq!(m[0] & 1, 0, "unicast");
        assert_eq!(m[0] & 2, 2, "locally administered");
    }
    assert_ne!(a, b);
}

#[test]
fn invalid_queue_sizes_are_refused() {
    for qs in [0u16, 1, 3, 100, 65535] {
        let r = Net::new(
            MemBackend::default(),
            NetConfig {
                queue_size: qs,
                ..Default::default()
            },
        );
        assert!(
            matches!(r, Err(NetError::InvalidQueueSize(q)) if q == qs),
            "{qs}"
        );
    }
}

#[test]
fn activation_needs_both_queues_and_sets_offloads() {
    let mem = memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut net = Net::new(MemBackend::default(), NetConfig::default()).unwrap();
    let mut q = Queue::new(256);
    q.ready = true;
    let r = net.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![q.clone(), Queue::new(256)],
        features: 0,
        interrupt: Arc::new(Irq::default()),
    });
    assert_eq!(r, Err(ActivateError::QueueNotReady(TX_QUEUE)));
    assert_eq!(net.backend().offloads, None);
    let h = Harness::new(all_features());
    assert_eq!(h.dev.backend().offloads, Some(all_features()));
}

#[test]
fn host_events_list_the_fd_and_limiter_timers() {
    let net = Net::new(MemBackend::default(), NetConfig::default()).unwrap();
    assert!(
        net.host_events().is_empty(),
        "no fd, no limits: nothing to watch"
    );
    let limit = RateLimit {
        bytes: Some(BucketConfig {
            rate: 1000,
            burst: 1000,
        }),
        ops: None,
    };
    let net = Net::new(
        MemBackend::default(),
        NetConfig {
            tx_rate_limit: Some(limit),
            ..Default::default()
        },
    )
    .unwrap();
    let ev = net.host_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].token, TOKEN_TX_LIMITER);
    assert_eq!(ev[0].interest, HostInterest::READABLE);
}

// ---------------------------------------------------------------------------------------------
// Transmit.

#[test]
fn tx_frames_reach_the_backend_byte_exact() {
    for (event_idx, pieces) in [
        (true, &[5usize, 7, 100][..]),
        (false, &[12][..]),
        (true, &[3][..]),
    ] {
        let mut features = all_features();
        if !event_idx {
            features &= !(1 << VIRTIO_F_RING_EVENT_IDX);
        }
        let mut h = Harness::new(features);
        let h0 = hdr(0, 0, 0, 0, 0);
        let f = frame(1514, 1);
        let head = h.send(&h0, &f, pieces);
        assert!(!h.dev.queue_notify(TX_QUEUE));
        assert_eq!(h.take_used(1), vec![(head, 0)]);
        let mut expect = h0.to_vec();
        expect.extend(&f);
        assert_eq!(h.dev.backend().tx, vec![expect]);
        let s = h.dev.stats();
        assert_eq!((s.tx_frames, s.tx_bytes), (1, 1514));
        assert_eq!(h.irq.used[1].load(Ordering::SeqCst), 1);
    }
}

#[test]
fn tx_many_frames_in_one_notification() {
    let mut h = Harness::new(all_features());
    let mut expect = Vec::new();
    for i in 0..100u8 {
        let f = frame(60 + usize::from(i), i);
        h.send(&hdr(0, 0, 0, 0, 0), &f, &[12]);
        let mut e = hdr(0, 0, 0, 0, 0).to_vec();
        e.extend(f);
        expect.push(e);
    }
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.take_used(1).len(), 100);
    assert_eq!(h.dev.backend().tx, expect);
}

#[test]
fn tx_fragmented_chain_is_copied_byte_exact() {
    // 100 pieces: more than the scatter list holds, so the device copies.
    let mut h = Harness::new(all_features());
    let f = frame(3000, 9);
    let mut bytes = hdr(0, 0, 0, 0, 0).to_vec();
    bytes.extend(&f);
    let bufs = h.readable(&bytes, &[30; 99]);
    assert_eq!(bufs.len(), 100);
    let head = h.submit(1, &bufs, true);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.take_used(1), vec![(head, 0)]);
    assert_eq!(h.dev.backend().tx, vec![bytes]);
}

#[test]
fn tx_tso_header_passes_through_unchanged() {
    let mut h = Harness::new(all_features());
    let th = hdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        1448,
        34,
        16,
    );
    let f = frame(65536, 3);
    h.send(&th, &f, &[12, 4096, 4096]);
    h.dev.queue_notify(TX_QUEUE);
    let out = &h.dev.backend().tx[0];
    assert_eq!(&out[..12], &th);
    assert_eq!(&out[12..], &f[..]);
    assert_eq!(h.dev.stats().tx_bytes, 65536);
}

#[test]
fn tx_header_rules() {
    let all = all_features();
    let none = 0u64;
    let ok = |h: [u8; 12], len, f| check_tx_header(&h, len, f).is_ok();
    assert!(ok(hdr(0, 0, 0, 0, 0), 60, none));
    // Partial checksum: needs CSUM, and must lie in the frame.
    assert!(!ok(hdr(1, 0, 0, 34, 16), 60, none));
    assert!(ok(hdr(1, 0, 0, 34, 16), 60, all));
    assert!(ok(hdr(1, 0, 0, 34, 24), 60, all)); // ends exactly at 60
    assert!(!ok(hdr(1, 0, 0, 34, 25), 60, all));
    assert!(!ok(hdr(1, 0, 0, u16::MAX, u16::MAX), 60, all)); // no overflow
                                                             // Flags other than NEEDS_CSUM.
    assert!(!ok(hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0), 60, all));
    assert!(!ok(hdr(0x80, 0, 0, 0, 0), 60, all));
    // GSO types: known, negotiated, with a size.
    for (gso, bit) in [
        (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_F_HOST_TSO4),
        (VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_F_HOST_TSO6),
        (VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_F_HOST_UFO),
    ] {
        assert!(ok(hdr(1, gso, 1400, 34, 16), 9000, all));
        assert!(!ok(hdr(1, gso, 1400, 34, 16), 9000, all & !(1 << bit)));
        assert!(!ok(hdr(1, gso, 0, 34, 16), 9000, all));
    }
    assert!(!ok(
        hdr(
            1,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            1400,
            34,
            16
        ),
        9000,
        all
    ));
    for gso in [2u8, 5, 6, 0x7f, 0xff] {
        assert!(!ok(hdr(0, gso, 1400, 0, 0), 9000, all), "{gso}");
    }
}

#[test]
fn tx_hostile_frames_are_dropped_counted_and_returned() {
    let mut h = Harness::new(all_features() & !(1 << VIRTIO_NET_F_HOST_TSO6));
    let good = hdr(0, 0, 0, 0, 0);
    // Header of 8 bytes only.
    let a = h.send(&good[..8], &[], &[8]);
    // Frame shorter than an Ethernet header, and empty.
    let b = h.send(&good, &frame(13, 0), &[12]);
    let c = h.send(&good, &[], &[12]);
    // Frame longer than MAX_FRAME_LEN.
    let d = h.send(&good, &frame(MAX_FRAME_LEN + 1, 0), &[12]);
    // Un-negotiated offload and a bad GSO type.
    let e = h.send(
        &hdr(1, VIRTIO_NET_HDR_GSO_TCPV6, 1400, 54, 16),
        &frame(9000, 0),
        &[12],
    );
    let f = h.send(&hdr(0, 9, 1400, 0, 0), &frame(100, 0), &[12]);
    // Only writable buffers: no header at all.
    let w = h.alloc(64);
    let g = h.submit(1, &[(w, 64, true)], false);
    // And a good one after all that.
    let ok = h.send(&good, &frame(64, 5), &[12]);
    h.dev.queue_notify(TX_QUEUE);
    let used = h.take_used(1);
    assert_eq!(used, [a, b, c, d, e, f, g, ok].map(|x| (x, 0)).to_vec());
    let s = h.dev.stats();
    assert_eq!(s.tx_malformed, 4, "{s:?}"); // a, e, f, g
    assert_eq!(s.tx_bad_length, 3, "{s:?}"); // b, c, d
    assert_eq!(s.tx_frames, 1);
    assert_eq!(s.tx_dropped(), 7);
    assert_eq!(h.dev.backend().tx.len(), 1);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn tx_chain_errors_and_broken_rings() {
    let mut h = Harness::new(all_features());
    // A descriptor that points outside guest memory.
    let bad = h.submit(1, &[(MEM_SIZE as u64 - 4, 64, false)], false);
    // A descriptor loop: 0 -> 0.
    let head = h.rings[1].next_desc;
    h.write_desc(h.rings[1].desc, head, DATA, 64, VIRTQ_DESC_F_NEXT, head);
    h.rings[1].next_desc += 1;
    h.publish(1, head);
    let ok = h.send(&hdr(0, 0, 0, 0, 0), &frame(60, 1), &[12]);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.take_used(1), vec![(bad, 0), (head, 0), (ok, 0)]);
    assert_eq!(h.dev.stats().bad_chains, 2);
    assert_eq!(h.dev.stats().tx_frames, 1);
    // avail.idx jumping ahead of the ring: the device asks for a reset and stops.
    let r = &h.rings[1];
    h.mem
        .write_obj(
            r.avail_idx.wrapping_add(1000).to_le(),
            GuestAddress(r.avail + 2),
        )
        .unwrap();
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 1);
    assert_eq!(h.dev.stats().queue_failures, 1);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(
        h.irq.needs_reset.load(Ordering::SeqCst),
        1,
        "broken queue is left alone"
    );
    // Reset and re-activation bring it back.
    h.dev.reset();
    h.activate(all_features());
    h.send(&hdr(0, 0, 0, 0, 0), &frame(60, 2), &[12]);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.dev.stats().tx_frames, 2);
}

#[test]
fn tx_backend_full_waits_for_writable_without_losing_frames() {
    let mut h = Harness::new(all_features());
    h.dev.backend_mut().tx_capacity = Some(1);
    for i in 0..3 {
        h.send(&hdr(0, 0, 0, 0, 0), &frame(60, i), &[12]);
    }
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.take_used(1).len(), 1);
    // Notifications while blocked do nothing (no spinning on a full backend).
    assert!(!h.dev.queue_notify(TX_QUEUE));
    assert!(h.take_used(1).is_empty());
    h.dev.backend_mut().tx_capacity = None;
    // A readiness report without WRITABLE does not resume transmission either.
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
    assert!(h.take_used(1).is_empty());
    h.dev.host_event(TOKEN_BACKEND, HostInterest::WRITABLE);
    assert_eq!(h.take_used(1).len(), 2);
    let tx = &h.dev.backend().tx;
    assert_eq!(tx.len(), 3);
    for (i, f) in tx.iter().enumerate() {
        assert_eq!(&f[12..], &frame(60, i as u8)[..]);
    }
    assert_eq!(h.dev.stats().tx_dropped(), 0);
}

#[test]
fn tx_backend_errors_drop_the_frame_and_continue() {
    let mut h = Harness::new(all_features());
    h.dev.backend_mut().fail_writes = true;
    let a = h.send(&hdr(0, 0, 0, 0, 0), &frame(60, 0), &[12]);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.take_used(1), vec![(a, 0)]);
    assert_eq!(h.dev.stats().tx_backend_errors, 1);
    h.dev.backend_mut().fail_writes = false;
    h.send(&hdr(0, 0, 0, 0, 0), &frame(60, 0), &[12]);
    h.dev.queue_notify(TX_QUEUE);
    assert_eq!(h.dev.stats().tx_frames, 1);
}

#[test]
fn tx_work_per_call_is_bounded() {
    let mut h = Harness::new(all_features());
    // Keep the ring full for more than one call's budget: 256 + 10 frames.
    for i in 0..256u16 {
        h.send(&hdr(0, 0, 0, 0, 0), &frame(60, i as u8), &[12]);
    }
    assert!(
        h.dev.queue_notify(TX_QUEUE),
        "stopped at the budget: call again"
    );
    assert_eq!(h.take_used(1).len(), MAX_FRAMES_PER_CALL);
    for i in 0..10u16 {
        h.send(&hdr(0, 0, 0, 0, 0), &frame(60, i as u8), &[12]);
    }
    assert!(!h.dev.queue_notify(TX_QUEUE));
    assert_eq!(h.take_used(1).len(), 10);
}

// ---------------------------------------------------------------------------------------------
// Receive.

fn rx_frame(h: [u8; 12], f: &[u8]) -> Vec<u8> {
    let mut v = h.to_vec();
    v.extend_from_slice(f);
    v
}

#[test]
fn rx_without_mergeable_buffers_fills_one_chain() {
    let mut h = Harness::new(all_features() & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    let f = frame(1514, 4);
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &f));
    let (head, bufs) = h.post_rx(&[100, 2000]); // the frame spans both buffers of the chain
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(h.take_used(0), vec![(head, 12 + 1514)]);
    let got = h.read_bufs(&bufs, 12 + 1514);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
    let s = h.dev.stats();
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 1514));
    assert_eq!(h.irq.used[0].load(Ordering::SeqCst), 1);
}

#[test]
fn rx_without_mergeable_buffers_drops_frames_too_big_for_a_chain() {
    let mut h = Harness::new(all_features() & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(3000, 0)));
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(500, 7)));
    let (head, bufs) = h.post_rx(&[1526]);
    h.dev.queue_notify(RX_QUEUE);
    // The big frame is dropped without consuming the chain; the small one uses it.
    assert_eq!(h.take_used(0), vec![(head, 512)]);
    assert_eq!(&h.read_bufs(&bufs, 512)[12..], &frame(500, 7)[..]);
    assert_eq!(h.dev.stats().rx_too_big, 1);
}

#[test]
fn rx_mergeable_buffers_span_chains_with_num_buffers() {
    let mut h = Harness::new(all_features());
    let f = frame(5000, 8);
    let th = hdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        1448,
        34,
        16,
    );
    h.dev.backend_mut().rx.push_back(rx_frame(th, &f));
    let chains: Vec<_> = (0..5).map(|_| h.post_rx(&[1526])).collect();
    h.dev.queue_notify(RX_QUEUE);
    let used = h.take_used(0);
    // 5012 bytes in 1526-byte chains: 4 chains, the last holding 434.
    assert_eq!(
        used,
        vec![
            (chains[0].0, 1526),
            (chains[1].0, 1526),
            (chains[2].0, 1526),
            (chains[3].0, 434)
        ]
    );
    let mut got = Vec::new();
    for ((_, bufs), &(_, len)) in chains.iter().zip(&used) {
        got.extend(h.read_bufs(bufs, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    // The offload header is passed through (apart from num_buffers).
    assert_eq!(&got[..10], &th[..10]);
    assert_eq!(&got[12..], &f[..]);
    // The fifth chain is still available for the next frame.
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(60, 1)));
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
    assert_eq!(h.take_used(0), vec![(chains[4].0, 72)]);
}

#[test]
fn rx_64k_gso_frame_with_mergeable_page_buffers() {
    let mut h = Harness::new(all_features());
    let f = frame(MAX_FRAME_LEN, 2);
    let th = hdr(1, VIRTIO_NET_HDR_GSO_TCPV6, 1428, 54, 16);
    h.dev.backend_mut().rx.push_back(rx_frame(th, &f));
    let chains: Vec<_> = (0..20).map(|_| h.post_rx(&[4096])).collect();
    h.dev.queue_notify(RX_QUEUE);
    let used = h.take_used(0);
    assert_eq!(used.len(), (12 + MAX_FRAME_LEN).div_ceil(4096));
    let mut got = Vec::new();
    for ((_, bufs), &(_, len)) in chains.iter().zip(&used) {
        got.extend(h.read_bufs(bufs, len));
    }
    assert_eq!(
        usize::from(u16::from_le_bytes([got[10], got[11]])),
        used.len()
    );
    assert_eq!(&got[..10], &th[..10]);
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn rx_waits_for_buffers_without_polling_the_backend() {
    let mut h = Harness::new(all_features());
    for i in 0..3 {
        h.dev
            .backend_mut()
            .rx
            .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(100, i)));
    }
    // The backend reports readable; the guest has posted nothing.
    assert!(!h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE));
    assert_eq!(h.dev.backend().reads, 1, "one frame read and held");
    assert_eq!(h.dev.stats().rx_no_buffer, 1);
    // More readiness reports and notifications without buffers: no reads, no drops.
    for _ in 0..10 {
        assert!(!h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE));
        assert!(!h.dev.queue_notify(RX_QUEUE));
    }
    assert_eq!(h.dev.backend().reads, 1);
    assert_eq!(
        h.dev.stats().rx_no_buffer,
        1,
        "counted once per waiting frame"
    );
    assert_eq!(h.dev.backend().rx.len(), 2);
    // The device asked for a kick (EVENT_IDX: avail_event = next_avail).
    let avail_event: u16 = h
        .mem
        .read_obj(GuestAddress(h.rings[0].used + 4 + 8 * 256))
        .unwrap();
    assert_eq!(avail_event, 0);
    // Buffers arrive with a kick: everything is delivered in order, then the backend is
    // drained until WouldBlock and not read again without a readiness report.
    let chains: Vec<_> = (0..3).map(|_| h.post_rx(&[2048])).collect();
    assert!(!h.dev.queue_notify(RX_QUEUE));
    let used = h.take_used(0);
    assert_eq!(used.len(), 3);
    for (i, ((_, bufs), &(_, len))) in chains.iter().zip(&used).enumerate() {
        assert_eq!(&h.read_bufs(bufs, len)[12..], &frame(100, i as u8)[..]);
    }
    assert_eq!(h.dev.backend().reads, 4);
    h.post_rx(&[2048]);
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(
        h.dev.backend().reads,
        4,
        "no read without a readiness report"
    );
    let s = h.dev.stats();
    assert_eq!((s.rx_frames, s.rx_too_big), (3, 0));
}

#[test]
fn rx_work_per_call_is_bounded() {
    let mut h = Harness::new(all_features());
    for i in 0..300u32 {
        h.dev
            .backend_mut()
            .rx
            .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(60, i as u8)));
    }
    for _ in 0..256 {
        h.post_rx(&[1526]);
    }
    assert!(
        h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE),
        "more to do"
    );
    assert_eq!(h.take_used(0).len(), MAX_FRAMES_PER_CALL);
    // The ring is empty now: the next call holds a frame and stops.
    assert!(!h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE));
    assert_eq!(h.dev.stats().rx_no_buffer, 1);
}

#[test]
fn rx_hostile_chains_are_returned_and_counted() {
    let mut h = Harness::new(all_features());
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(60, 3)));
    // Too small for the header, readable-only, and out of memory: each returned with 0.
    let (a, _) = h.post_rx(&[8]);
    let r = h.alloc(64);
    let b = h.submit(0, &[(r, 64, false)], false);
    let c = h.submit(0, &[(MEM_SIZE as u64 - 8, 64, true)], false);
    let (d, bufs) = h.post_rx(&[1526]);
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(h.take_used(0), vec![(a, 0), (b, 0), (c, 0), (d, 72)]);
    assert_eq!(&h.read_bufs(&bufs, 72)[12..], &frame(60, 3)[..]);
    assert_eq!(h.dev.stats().bad_chains, 3);
    // A backend frame shorter than a header is dropped and counted.
    h.dev.backend_mut().rx.push_back(vec![0; 5]);
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
    assert_eq!(h.dev.stats().rx_backend_errors, 1);
}

#[test]
fn rx_frame_larger_than_the_whole_ring_is_dropped() {
    let cfg = NetConfig {
        queue_size: 4,
        ..Default::default()
    };
    let mut h = Harness::with(MemBackend::default(), cfg, all_features());
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(1000, 0)));
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(40, 1)));
    let chains: Vec<_> = (0..4).map(|_| h.post_rx(&[64])).collect();
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(h.dev.stats().rx_too_big, 1);
    // The chains were not used for the dropped frame: the small frame takes the first.
    assert_eq!(h.take_used(0), vec![(chains[0].0, 52)]);
}

#[test]
fn reset_drops_the_held_frame_and_reactivation_works() {
    let mut h = Harness::new(all_features());
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(60, 0)));
    h.dev
        .backend_mut()
        .rx
        .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(60, 1)));
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE); // holds frame 0
    h.dev.reset();
    assert!(!h.dev.queue_notify(RX_QUEUE), "inactive: nothing");
    h.activate(all_features());
    let (head, bufs) = h.post_rx(&[200]);
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(h.take_used(0), vec![(head, 72)]);
    assert_eq!(&h.read_bufs(&bufs, 72)[12..], &frame(60, 1)[..]);
}

// ---------------------------------------------------------------------------------------------
// Rate limiting.

fn limited(
    rx: Option<RateLimit>,
    tx: Option<RateLimit>,
) -> (Harness<MemBackend>, Arc<ManualClock>) {
    let mut h = Harness::new(all_features());
    let clock = Arc::new(ManualClock::default());
    let mk = |l: Option<RateLimit>| {
        RateLimiter::with_clock(l.unwrap_or_default(), clock.clone()).unwrap()
    };
    h.dev.set_rate_limiters(mk(rx), mk(tx));
    (h, clock)
}

#[test]
fn tx_rate_limit_throttles_and_refills() {
    let pps = RateLimit {
        bytes: None,
        ops: Some(BucketConfig { rate: 2, burst: 2 }),
    };
    let (mut h, clock) = limited(None, Some(pps));
    for i in 0..5 {
        h.send(&hdr(0, 0, 0, 0, 0), &frame(60, i), &[12]);
    }
    assert!(!h.dev.queue_notify(TX_QUEUE));
    assert_eq!(h.take_used(1).len(), 2, "the burst");
    assert_eq!(h.dev.stats().tx_throttled, 1);
    // Throttled: kicks do nothing until the timer fires (no spinning).
    for _ in 0..5 {
        assert!(!h.dev.queue_notify(TX_QUEUE));
    }
    assert!(h.take_used(1).is_empty());
    assert_eq!(h.dev.stats().tx_throttled, 1);
    // Half a second: one token back.
    clock.advance(Duration::from_millis(500));
    h.dev.host_event(TOKEN_TX_LIMITER, HostInterest::READABLE);
    assert_eq!(h.take_used(1).len(), 1);
    clock.advance(Duration::from_secs(10)); // capped at the burst of 2
    h.dev.host_event(TOKEN_TX_LIMITER, HostInterest::READABLE);
    assert_eq!(h.take_used(1).len(), 2);
    let tx = &h.dev.backend().tx;
    assert_eq!(tx.len(), 5, "nothing dropped, order kept");
    for (i, f) in tx.iter().enumerate() {
        assert_eq!(&f[12..], &frame(60, i as u8)[..]);
    }
}

#[test]
fn rx_rate_limit_holds_frames_in_the_backend() {
    let bps = RateLimit {
        bytes: Some(BucketConfig {
            rate: 1000,
            burst: 1000,
        }),
        ops: None,
    };
    let (mut h, clock) = limited(Some(bps), None);
    for i in 0..4 {
        h.dev
            .backend_mut()
            .rx
            .push_back(rx_frame(hdr(0, 0, 0, 0, 0), &frame(400, i)));
        h.post_rx(&[2048]);
    }
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
    assert_eq!(
        h.take_used(0).len(),
        2,
        "1000 bytes of burst: two 400-byte frames"
    );
    assert_eq!(h.dev.stats().rx_throttled, 1);
    let reads = h.dev.backend().reads;
    h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
    h.dev.queue_notify(RX_QUEUE);
    assert_eq!(
        h.dev.backend().reads,
        reads,
        "throttled: the backend is not touched"
    );
    clock.advance(Duration::from_millis(600)); // 600 + 200 left = 800: two more
    h.dev.host_event(TOKEN_RX_LIMITER, HostInterest::READABLE);
    assert_eq!(h.take_used(0).len(), 2);
    assert_eq!(h.dev.stats().rx_frames, 4);
}

// ---------------------------------------------------------------------------------------------
// TAP (root and /dev/net/tun; otherwise SKIPPED, or failed with SMOLVM_REQUIRE_NET=1).

#[cfg(target_os = "linux")]
mod tap_tests {
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// A TAP for a test, or `None` after a loud SKIPPED when the host cannot make one.
    fn tap(cfg: &TapConfig) -> Option<Tap> {
        match Tap::create(cfg) {
            Ok(t) => Some(t),
            Err(e @ (NetError::PermissionDenied { .. } | NetError::TunUnavailable { .. })) => {
                if std::env::var("SMOLVM_REQUIRE_NET").as_deref() == Ok("1") {
                    panic!("SMOLVM_REQUIRE_NET=1 but no TAP can be created: {e}");
                }
                eprintln!("SKIPPED: cannot create a TAP device: {e}");
                None
            }
            Err(e) => panic!("creating a TAP: {e}"),
        }
    }

    fn exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }

    /// Local experimental EtherType, so the packet socket sees only our frames.
    const ETHERTYPE: u16 = 0x88b5;

    /// A raw packet socket bound to `ifindex`, receiving only [`ETHERTYPE`].
    fn packet_socket(ifindex: u32) -> OwnedFd {
        // SAFETY: plain socket(2) call; result checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETHERTYPE.to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh descriptor, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        fd
    }

    fn poll_in(fd: i32, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }

    fn test_frame(src: [u8; 6], seed: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6]; // broadcast
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        f.extend(frame(200, seed));
        f
    }

    #[test]
    fn create_sets_address_and_vanishes_on_drop() {
        let name = format!("smolt{}", std::process::id() % 100_000);
        let Some(t) = tap(&TapConfig {
            name: Some(name.clone()),
            ipv4: Some((Ipv4Addr::new(10, 213, 7, 1), 24)),
            mtu: Some(9000),
        }) else {
            return;
        };
        assert_eq!(t.name(), name);
        assert!(exists(&name));
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).unwrap();
        assert_eq!(mtu.trim(), "9000");
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "interface is up");
        assert!(t.if_index().unwrap() > 0);
        drop(t);
        assert!(
            !exists(&name),
            "non-persistent TAP must vanish with its descriptor"
        );
    }

    #[test]
    fn bad_names_and_prefixes_are_refused_before_the_kernel() {
        for n in ["", "a/b", "has space", "sixteen-chars-xx"] {
            let r = Tap::create(&TapConfig {
                name: Some(n.into()),
                ..Default::default()
            });
            assert!(matches!(r, Err(NetError::InvalidName { .. })), "{n:?}");
        }
        let r = Tap::create(&TapConfig {
            ipv4: Some((Ipv4Addr::LOCALHOST, 33)),
            ..Default::default()
        });
        assert!(matches!(r, Err(NetError::InvalidPrefix(33))));
    }

    #[test]
    fn tap_round_trip_through_the_device() {
        let Some(t) = tap(&TapConfig {
            ipv4: Some((Ipv4Addr::new(10, 213, 8, 1), 24)),
            ..Default::default()
        }) else {
            return;
        };
        let ifindex = t.if_index().unwrap();
        let name = t.name().to_string();
        let sock = packet_socket(ifindex);
        let mac = [0x02, 0, 0, 0, 0x13, 0x37];
        let mut h = Harness::with(
            t,
            NetConfig {
                mac: Some(mac),
                ..Default::default()
            },
            all_features(),
        );
        assert_eq!(h.dev.host_events()[0].token, TOKEN_BACKEND);

        // Guest -> host: the device writes the frame to the TAP, the packet socket sees it.
        let out = test_frame(mac, 1);
        h.send(&hdr(0, 0, 0, 0, 0), &out, &[12, 20]);
        h.dev.queue_notify(TX_QUEUE);
        assert_eq!(h.dev.stats().tx_frames, 1, "{:?}", h.dev.stats());
        assert!(
            poll_in(sock.as_raw_fd(), 10_000),
            "frame never reached the host"
        );
        let mut buf = [0u8; 2048];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert_eq!(&buf[..n as usize], &out[..]);

        // Host -> guest: a frame sent on the interface is read from the TAP into a buffer.
        let inbound = test_frame([0x02, 0, 0, 0, 0, 0x99], 2);
        // SAFETY: `inbound` is valid for its length.
        let n = unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(
            n as usize,
            inbound.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
        // The kernel may also send its own frames (IPv6 neighbour discovery): find ours.
        let mut found = false;
        for _ in 0..50 {
            let fd = h.dev.host_events()[0].fd;
            if !poll_in(fd, 10_000) {
                break;
            }
            let (head, bufs) = h.post_rx(&[4096]);
            h.dev.host_event(TOKEN_BACKEND, HostInterest::READABLE);
            for (id, len) in h.take_used(0) {
                assert_eq!(id, head);
                let got = h.read_bufs(&bufs, len);
                if got[12..] == inbound[..] {
                    found = true;
                }
            }
            if found {
                break;
            }
        }
        assert!(found, "frame sent on {name} never reached the guest");

        // A 64 KiB TCPv4 TSO frame with its GSO header is accepted by the TAP as is.
        let mut tso = vec![0u8; 65536];
        tso[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]); // not the host: dropped there
        tso[6..12].copy_from_slice(&mac);
        tso[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        tso[14] = 0x45;
        tso[16..18].copy_from_slice(&65522u16.to_be_bytes());
        tso[22] = 64;
        tso[23] = 6;
        tso[26..30].copy_from_slice(&[10, 213, 8, 2]);
        tso[30..34].copy_from_slice(&[10, 213, 8, 1]);
        tso[46] = 5 << 4;
        tso[47] = 0x10;
        let th = hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4,
            1448,
            34,
            16,
        );
        h.send(&th, &tso, &[12, 54, 4096]);
        h.dev.queue_notify(TX_QUEUE);
        let s = h.dev.stats();
        assert_eq!((s.tx_frames, s.tx_backend_errors), (2, 0), "{s:?}");
        drop(h);
        assert!(!exists(&name));
    }
}

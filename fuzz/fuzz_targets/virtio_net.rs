//! The virtio-net device (`devices::virtio::net::Net`) over the in-memory backend
//! (`MemBackend`), with both queues, descriptor tables, headers and frames made of arbitrary
//! bytes.
//!
//! Guest memory is one 64 KiB region. The input is:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | queue size `1 << (b0 % 9)` (1-256), both queues |
//! | 1 | bit 0: INDIRECT_DESC; bit 1: EVENT_IDX; bit 2: MRG_RXBUF; bit 3: CSUM + HOST_TSO4/6/UFO; bit 4: GUEST_CSUM + GUEST_TSO4/6/UFO; bit 5: rate limits (manual clock) |
//! | 2-3 | image length `n` (little-endian) |
//! | 4.. | `n` bytes copied into guest memory from address 0, then operations |
//!
//! Both queues are packed from address 0 (see `layout`): receive descriptor table, available
//! and used rings, then the transmit ones. Operation byte, bits 0-2:
//! 0 = the driver makes `1 + bits 3-5` more transmit chains available and notifies;
//! 1 = the same on the receive queue;
//! 2 = the backend gets a frame: 2 length bytes follow (plus 64 KiB if bit 3, to pass the
//!     device's buffer), its first bytes are taken from the input;
//! 3 = backend readiness (bit 3: READABLE, bit 4: WRITABLE, bit 5: HANGUP);
//! 4 = the clock advances by `bits 3-7` × 50 ms and both limiter timers fire;
//! 5 = device reset and re-activation;
//! 6 = the backend's transmit side: bit 3 toggles failing writes, bit 4 toggles a capacity of
//!     the frames written so far (WouldBlock), bits 5-6 = 3 lift it;
//! 7 = the driver writes one byte of guest memory (2 offset bytes and the value follow).
//!
//! Checks: nothing panics or hangs; every frame that reaches the backend is a header and an
//! Ethernet frame of 14..=65550 bytes whose header follows the negotiated offloads; the
//! device's counters agree with what the backend saw (frames and bytes sent, frames received
//! at most those offered).

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smolvm::devices::rate_limiter::{BucketConfig, ManualClock, RateLimit, RateLimiter};
use smolvm::devices::virtio::net::*;
use smolvm::devices::virtio::{
    ActivateContext, HostInterest, Queue, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const HEADER: usize = 4;
const MEM: usize = 0x10000;
const MAX_OPS: usize = 256;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

/// (descriptor table, available ring, used ring) of each queue, packed from 0.
fn layout(size: u16) -> [(u64, u64, u64); 2] {
    let s = u64::from(size);
    let align = |x: u64, a: u64| (x + a - 1) & !(a - 1);
    let rx_desc = 0;
    let rx_avail = rx_desc + 16 * s;
    let rx_used = align(rx_avail + 6 + 2 * s, 4);
    let tx_desc = align(rx_used + 6 + 8 * s, 16);
    let tx_avail = tx_desc + 16 * s;
    let tx_used = align(tx_avail + 6 + 2 * s, 4);
    [(rx_desc, rx_avail, rx_used), (tx_desc, tx_avail, tx_used)]
}

fn activate(dev: &mut Net<MemBackend>, mem: &GuestMemoryMmap<()>, size: u16, features: u64) {
    let queues = layout(size)
        .iter()
        .map(|&(d, a, u)| {
            let mut q = Queue::new(256);
            q.size = size;
            q.desc_table = GuestAddress(d);
            q.avail_ring = GuestAddress(a);
            q.used_ring = GuestAddress(u);
            q.indirect = features & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0;
            q.event_idx = features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
            q.ready = true;
            assert!(q.is_valid(mem));
            q
        })
        .collect();
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues,
        features,
        interrupt: Arc::new(NoIrq),
    })
    .unwrap();
}

fn check_sent(frame: &[u8], features: u64) {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    assert!(
        frame.len() >= VNET_HDR_LEN + MIN_FRAME_LEN,
        "short frame sent"
    );
    assert!(
        frame.len() <= VNET_HDR_LEN + MAX_FRAME_LEN,
        "oversized frame sent"
    );
    let (flags, gso) = (frame[0], frame[1]);
    assert!(
        flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM == 0,
        "bad flags {flags:#x}"
    );
    if flags != 0 {
        assert!(has(VIRTIO_NET_F_CSUM));
    }
    match gso {
        VIRTIO_NET_HDR_GSO_NONE => {}
        VIRTIO_NET_HDR_GSO_TCPV4 => assert!(has(VIRTIO_NET_F_HOST_TSO4)),
        VIRTIO_NET_HDR_GSO_TCPV6 => assert!(has(VIRTIO_NET_F_HOST_TSO6)),
        VIRTIO_NET_HDR_GSO_UDP => assert!(has(VIRTIO_NET_F_HOST_UFO)),
        g => panic!("GSO type {g:#x} sent"),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let size = 1u16 << (data[0] % 9);
    let flags = data[1];
    let image_len = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let body = &data[HEADER..];
    let (img, ops) = body.split_at(image_len.min(body.len()));
    mem.write_slice(&img[..img.len().min(MEM)], GuestAddress(0))
        .unwrap();

    let mut dev = Net::new(MemBackend::default(), NetConfig::default()).unwrap();
    let mut features = dev.device_features();
    let mut drop_bits = |on: bool, bits: &[u32]| {
        if !on {
            for b in bits {
                features &= !(1u64 << b);
            }
        }
    };
    drop_bits(flags & 1 != 0, &[VIRTIO_F_RING_INDIRECT_DESC]);
    drop_bits(flags & 2 != 0, &[VIRTIO_F_RING_EVENT_IDX]);
    drop_bits(flags & 4 != 0, &[VIRTIO_NET_F_MRG_RXBUF]);
    drop_bits(
        flags & 8 != 0,
        &[
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        ],
    );
    drop_bits(
        flags & 16 != 0,
        &[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ],
    );
    let clock = Arc::new(ManualClock::default());
    if flags & 32 != 0 {
        let rx = RateLimit {
            bytes: Some(BucketConfig {
                rate: 20_000,
                burst: 10_000,
            }),
            ops: None,
        };
        let tx = RateLimit {
            bytes: None,
            ops: Some(BucketConfig { rate: 40, burst: 4 }),
        };
        dev.set_rate_limiters(
            RateLimiter::with_clock(rx, clock.clone()).unwrap(),
            RateLimiter::with_clock(tx, clock.clone()).unwrap(),
        );
    }
    activate(&mut dev, &mem, size, features);
    let lay = layout(size);
    let mut avail = [0u16; 2];
    let mut offered = 0u64;

    let mut ops = ops.iter().copied().take(MAX_OPS * 4);
    let mut n_ops = 0;
    while let Some(op) = ops.next() {
        n_ops += 1;
        if n_ops > MAX_OPS {
            break;
        }
        match op & 7 {
            q @ (0 | 1) => {
                let q = usize::from(1 - q); // op 0: transmit (queue 1), op 1: receive (queue 0)
                let n = 1 + u16::from((op >> 3) & 7);
                avail[q] = avail[q].wrapping_add(n);
                mem.write_obj(avail[q].to_le(), GuestAddress(lay[q].1 + 2))
                    .unwrap();
                dev.queue_notify(q as u16);
            }
            2 => {
                let lo = ops.next().unwrap_or(0);
                let hi = ops.next().unwrap_or(0);
                let mut len = usize::from(u16::from_le_bytes([lo, hi]));
                if op & 8 != 0 {
                    len += 0x10000;
                }
                let mut frame = vec![0u8; len];
                for b in frame.iter_mut().take(32) {
                    *b = ops.next().unwrap_or(0);
                }
                dev.backend_mut().rx.push_back(frame);
                offered += 1;
            }
            3 => {
                let mut ready = HostInterest::empty();
                if op & 8 != 0 {
                    ready |= HostInterest::READABLE;
                }
                if op & 16 != 0 {
                    ready |= HostInterest::WRITABLE;
                }
                if op & 32 != 0 {
                    ready |= HostInterest::HANGUP;
                }
                dev.host_event(TOKEN_BACKEND, ready);
            }
            4 => {
                clock.advance(Duration::from_millis(50 * u64::from(op >> 3)));
                dev.host_event(TOKEN_RX_LIMITER, HostInterest::READABLE);
                dev.host_event(TOKEN_TX_LIMITER, HostInterest::READABLE);
            }
            5 => {
                dev.reset();
                activate(&mut dev, &mem, size, features);
                avail = [0, 0];
            }
            6 => {
                let b = dev.backend_mut();
                if op & 8 != 0 {
                    b.fail_writes = !b.fail_writes;
                }
                if op & 16 != 0 {
                    b.tx_capacity = match b.tx_capacity {
                        Some(_) => None,
                        None => Some(b.tx.len()),
                    };
                }
                if (op >> 5) & 3 == 3 {
                    b.tx_capacity = None;
                }
            }
            _ => {
                let lo = ops.next().unwrap_or(0);
                let hi = ops.next().unwrap_or(0);
                let v = ops.next().unwrap_or(0);
                let off = u64::from(u16::from_le_bytes([lo, hi]));
                mem.write_obj(v, GuestAddress(off)).unwrap();
            }
        }
    }

    let s = dev.stats();
    let sent = &dev.backend().tx;
    for f in sent {
        check_sent(f, features);
    }
    assert_eq!(s.tx_frames, sent.len() as u64);
    let bytes: u64 = sent.iter().map(|f| (f.len() - VNET_HDR_LEN) as u64).sum();
    assert_eq!(s.tx_bytes, bytes);
    assert!(s.rx_frames + s.rx_too_big + s.rx_backend_errors <= offered);
});

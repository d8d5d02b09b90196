//! The virtio-blk device (`devices::virtio::block::Block`) serving request chains made of
//! arbitrary bytes, over a small copy-on-write overlay disk kept in memory.
//!
//! Guest memory is one 64 KiB region. The input is:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | queue size `1 << (b0 % 9)` (1-256) |
//! | 1 | bit 0: INDIRECT_DESC negotiated; bit 1: EVENT_IDX negotiated; bit 2: read-only disk; bit 3: DISCARD / WRITE_ZEROES not negotiated |
//! | 2-3 | image length `n` (little-endian) |
//! | 4.. | `n` bytes copied into guest memory from address 0 (descriptor table, available ring and used ring are packed there), then operations, one byte each |
//!
//! Operation bits 0-1: 0 = the driver makes one more chain available (`avail.idx =
//! next_avail + 1`) and notifies; 1 = the same with `1 + bits 2-4` chains; 2 = device reset and
//! re-activation with a fresh queue; 3 = the driver sets or clears `VIRTQ_AVAIL_F_NO_INTERRUPT`
//! (bit 2).
//!
//! Checks: nothing panics (the device's own `debug_assert!` checks every used length against
//! the chain's writable bytes); for a single-chain notification, a shadow copy of the queue pops
//! the same chain first and the used element returns that head with a used length of at most
//! its writable bytes (0 for a chain error, at least 1 when the chain has a writable byte); the
//! base image is never modified.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::block::{
    Block, DiskImage, DiskMode, OverlayTarget, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
};
use smolvm::devices::virtio::{
    ActivateContext, Queue, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const HEADER: usize = 4;
const MEM: usize = 0x10000;
const MAX_OPS: usize = 256;
const BASE_LEN: usize = 64 * 512;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

fn base_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ 0x5a
}

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("smolvm-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&p, (0..BASE_LEN).map(base_byte).collect::<Vec<_>>()).unwrap();
        p
    })
}

struct Layout {
    size: u16,
    avail: u64,
    used: u64,
}

fn activate(dev: &mut Block<DiskImage>, mem: &GuestMemoryMmap<()>, l: &Layout, features: u64) {
    let mut q = Queue::new(256);
    q.size = l.size;
    q.desc_table = GuestAddress(0);
    q.avail_ring = GuestAddress(l.avail);
    q.used_ring = GuestAddress(l.used);
    q.indirect = features & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0;
    q.event_idx = features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
    q.ready = true;
    assert!(q.is_valid(mem));
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![q],
        features,
        interrupt: Arc::new(NoIrq),
    })
    .unwrap();
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

    let mode = if flags & 4 != 0 {
        DiskMode::ReadOnly
    } else {
        DiskMode::Overlay(OverlayTarget::Memory)
    };
    let disk = DiskImage::open(base(), mode).unwrap();
    let mut dev = Block::new(disk);
    let mut features = dev.device_features();
    if flags & 1 == 0 {
        features &= !(1 << VIRTIO_F_RING_INDIRECT_DESC);
    }
    if flags & 2 == 0 {
        features &= !(1 << VIRTIO_F_RING_EVENT_IDX);
    }
    if flags & 8 != 0 {
        features &= !((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES));
    }
    let avail = 16 * u64::from(size);
    let l = Layout {
        size,
        avail,
        used: (avail + 6 + 2 * u64::from(size) + 3) & !3,
    };
    activate(&mut dev, &mem, &l, features);

    for &op in ops.iter().take(MAX_OPS) {
        match op & 3 {
            0 | 1 => {
                let state = dev.state();
                if state.needs_reset {
                    continue;
                }
                let q = state.queue.expect("activated");
                let n = if op & 3 == 0 {
                    1
                } else {
                    1 + u16::from((op >> 2) & 7)
                };
                mem.write_obj(
                    q.next_avail.wrapping_add(n).to_le(),
                    GuestAddress(l.avail + 2),
                )
                .unwrap();
                // Shadow pop of the first chain, before the device can change any memory.
                let mut shadow = q.clone();
                let expect = match shadow.pop(&mem) {
                    Ok(Some(c)) => Some((c.head_index(), c.writable_len(), true)),
                    Err(e) => e.chain_head().map(|h| (h, 0, false)),
                    Ok(None) => None,
                };
                let used_before = q.next_used;
                dev.queue_notify(0);
                let after = dev.state();
                if let (Some((head, wlen, chain_ok)), Some(qa)) = (expect, after.queue.as_ref()) {
                    if qa.next_used != used_before {
                        let slot = u64::from(used_before & (size - 1));
                        let e = l.used + 4 + 8 * slot;
                        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
                        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                        // The element can be overwritten only by the device's own later data
                        // writes into the used ring (a later request's buffer there): check
                        // when only one request completed.
                        if qa.next_used == used_before.wrapping_add(1) {
                            assert_eq!(id, u32::from(head));
                            assert!(u64::from(len) <= wlen, "used {len} > writable {wlen}");
                            if !chain_ok {
                                assert_eq!(len, 0);
                            } else if wlen > 0 {
                                assert!(len >= 1, "status byte not counted");
                            }
                        }
                    }
                }
            }
            2 => {
                dev.reset();
                activate(&mut dev, &mem, &l, features);
            }
            _ => {
                let f: u16 = if op & 4 != 0 { 1 } else { 0 };
                mem.write_obj(f.to_le(), GuestAddress(l.avail)).unwrap();
            }
        }
    }
    drop(dev);
    let now = std::fs::read(base()).unwrap();
    assert!(
        now.iter().enumerate().all(|(i, &b)| b == base_byte(i)),
        "base image changed"
    );
});

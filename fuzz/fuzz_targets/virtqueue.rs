//! The device side of a split virtqueue (`devices::virtio::queue`) against rings, descriptor
//! tables and buffers made of arbitrary bytes.
//!
//! Guest memory is two regions with a hole between them: `[0, 0x4000)` and `[0x5000, 0x9000)`.
//! The input is:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | queue size `1 << (b0 % 9)` (1-256; the device maximum is 256) |
//! | 1 | bit 0: INDIRECT_DESC negotiated; bit 1: EVENT_IDX negotiated; bit 2: ring addresses from bytes 6-11 (anywhere in the first 64 KiB, possibly misaligned or in the hole) instead of packed at 0; bit 3: use the queue even if `is_valid` says no |
//! | 2-3 | starting `next_avail` / `next_used` (little-endian; exercises wrap-around) |
//! | 4-5 | image length `n` (little-endian) |
//! | 6-11 | descriptor table, available ring, used ring addresses (u16 each, with bit 2) |
//! | 12.. | `n` bytes copied into guest memory from address 0 (the rings, when packed, come first), then operations, one byte each |
//!
//! Operation bits 0-1: 0 = pop a chain and process it (read the readable part and write the
//! writable part at an offset taken from bits 2-7, then `add_used`; a chain error is completed
//! with length 0), 1 = `needs_notification`, 2 = `enable_notification` / `disable_notification`
//! (bit 2), 3 = the driver adds `bits 2-4` entries to `avail.idx`.
//!
//! Checks: nothing panics; `pop` advances `next_avail` by exactly one when it returns a chain or
//! a chain error, and not at all on `Ok(None)` or a queue-level error; `add_used` advances
//! `next_used` by one and publishes it in `used.idx`; a popped chain has 1..=size buffers, all
//! readable ones first, every non-empty buffer inside guest memory, and totals that match; the
//! copy helpers never fail on a popped chain and copy exactly what fits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::{Queue, QueueError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const HEADER: usize = 12;
const MAX_OPS: usize = 512;

fn image(mem: &GuestMemoryMmap<()>, bytes: &[u8]) {
    let first = bytes.len().min(0x4000);
    mem.write_slice(&bytes[..first], GuestAddress(0)).unwrap();
    let rest = &bytes[first..];
    let rest = &rest[..rest.len().min(0x4000)];
    mem.write_slice(rest, GuestAddress(0x5000)).unwrap();
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x5000), 0x4000)])
            .unwrap();
    let size = 1u16 << (data[0] % 9);
    let flags = data[1];
    let start = u16::from_le_bytes([data[2], data[3]]);
    let image_len = usize::from(u16::from_le_bytes([data[4], data[5]]));
    let word = |i: usize| u64::from(u16::from_le_bytes([data[i], data[i + 1]]));

    let mut q = Queue::new(256);
    q.size = size;
    if flags & 4 != 0 {
        q.desc_table = GuestAddress(word(6));
        q.avail_ring = GuestAddress(word(8));
        q.used_ring = GuestAddress(word(10));
    } else {
        let avail = 16 * u64::from(size);
        q.desc_table = GuestAddress(0);
        q.avail_ring = GuestAddress(avail);
        q.used_ring = GuestAddress((avail + 6 + 2 * u64::from(size) + 3) & !3);
    }
    q.indirect = flags & 1 != 0;
    q.event_idx = flags & 2 != 0;
    q.next_avail = start;
    q.next_used = start;
    let valid = q.is_valid(&mem);
    if !valid && flags & 8 == 0 {
        return;
    }
    q.ready = true;

    let body = &data[HEADER..];
    let (img, ops) = body.split_at(image_len.min(body.len()));
    image(&mem, img);

    let mut buf = vec![0u8; 0x1_0000];
    for &op in ops.iter().take(MAX_OPS) {
        match op & 3 {
            0 => {
                let before = q.next_avail;
                match q.pop(&mem) {
                    Ok(None) => assert_eq!(q.next_avail, before),
                    Ok(Some(chain)) => {
                        assert_eq!(q.next_avail, before.wrapping_add(1));
                        assert!(chain.head_index() < size);
                        let descs = chain.descriptors();
                        assert!(!descs.is_empty() && descs.len() <= usize::from(size));
                        assert_eq!(chain.readable().len() + chain.writable().len(), descs.len());
                        assert!(chain.readable().iter().all(|d| !d.writable));
                        assert!(chain.writable().iter().all(|d| d.writable));
                        let sum = |ds: &[smolvm::devices::virtio::Descriptor]| {
                            ds.iter().map(|d| u64::from(d.len)).sum::<u64>()
                        };
                        assert_eq!(sum(chain.readable()), chain.readable_len());
                        assert_eq!(sum(chain.writable()), chain.writable_len());
                        for d in descs.iter().filter(|d| d.len > 0) {
                            assert!(d.addr.0.checked_add(u64::from(d.len)).is_some());
                            assert!(mem.check_range(d.addr, d.len as usize));
                        }
                        let offset = u64::from(op >> 2) * 3;
                        let cap = buf.len() as u64;
                        let want = |total: u64| total.saturating_sub(offset).min(cap);
                        let n = chain.read_at(&mem, offset, &mut buf).unwrap();
                        assert_eq!(n as u64, want(chain.readable_len()));
                        let n = chain.write_at(&mem, offset, &buf).unwrap();
                        assert_eq!(n as u64, want(chain.writable_len()));
                        complete(&mut q, &mem, chain.head_index(), n as u32);
                    }
                    Err(e) => {
                        let consumed = !matches!(
                            e,
                            QueueError::NotReady { .. }
                                | QueueError::RingAccess { .. }
                                | QueueError::AvailIndexJump { .. }
                        );
                        let expected = if consumed {
                            before.wrapping_add(1)
                        } else {
                            before
                        };
                        assert_eq!(q.next_avail, expected, "{e}");
                        assert!(
                            !matches!(
                                e,
                                QueueError::ChainTooShort { .. } | QueueError::Memory { .. }
                            ),
                            "{e}"
                        );
                        if valid {
                            assert!(
                                !matches!(
                                    e,
                                    QueueError::NotReady { .. } | QueueError::RingAccess { .. }
                                ),
                                "{e}"
                            );
                        }
                        if let Some(head) = e.chain_head() {
                            assert!(head < size);
                            complete(&mut q, &mem, head, 0);
                        }
                    }
                }
            }
            1 => {
                let _ = q.needs_notification(&mem);
            }
            2 => {
                if op & 4 != 0 {
                    let _ = q.enable_notification(&mem);
                } else {
                    q.disable_notification(&mem);
                }
            }
            _ => {
                let addr = GuestAddress(q.avail_ring.0.wrapping_add(2));
                if let Ok(idx) = mem.read_obj::<u16>(addr) {
                    let _ = mem.write_obj(idx.wrapping_add(u16::from((op >> 2) & 7)), addr);
                }
            }
        }
    }
});

fn complete(q: &mut Queue, mem: &GuestMemoryMmap<()>, head: u16, len: u32) {
    let before = q.next_used;
    match q.add_used(mem, head, len) {
        Ok(()) => {
            assert_eq!(q.next_used, before.wrapping_add(1));
            let idx: u16 = mem.read_obj(GuestAddress(q.used_ring.0 + 2)).unwrap();
            assert_eq!(u16::from_le(idx), q.next_used);
        }
        Err(e) => {
            assert_eq!(q.next_used, before);
            assert!(matches!(e, QueueError::RingAccess { .. }), "{e}");
        }
    }
}

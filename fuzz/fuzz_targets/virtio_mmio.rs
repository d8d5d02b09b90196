//! The virtio-mmio transport (`devices::virtio::mmio::MmioTransport`) against arbitrary
//! register reads and writes, with a small device behind it that really uses its queues.
//!
//! Guest memory is `[0, 0x8000)`. The device (`Sink`) has two queues (maximum sizes 8 and 4),
//! offers VERSION_1, EVENT_IDX, INDIRECT_DESC and one device-specific bit, has a 12-byte
//! configuration space, and on a notification pops every available chain, completes it and
//! signals the used queue; a queue-level error makes it call `set_needs_reset`.
//!
//! The input is a sequence of 8-byte records:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | bits 0-1: 0 = register read, 1 = register write, 2 = device/event-loop action, 3 = driver writes guest memory; bits 2-4: access size 4, 4, 4, 4, 1, 2, 8, 3; bit 5: offset is `KNOWN[b1]` (else the raw little-endian `b1 b2` modulo 0x1100); bit 6 (writes): value is `Status \| value` (Linux's `virtio_add_status`) |
//! | 1-2 | offset / action (b1 % 4: used-queue signal, config change, needs-reset, `notify_queue(b2)`) / memory address (`b1 b2` modulo 0x8000) |
//! | 3-7 | value (little-endian, the first `size` bytes are used; a memory write stores b3-b6) |
//!
//! Checks: nothing panics; MagicValue always reads "virt"; accesses other than aligned 4-byte
//! ones below the config space read as zero; DRIVER_OK is set exactly when the device is
//! activated and implies FEATURES_OK, DRIVER and ACKNOWLEDGE; FEATURES_OK implies the driver's
//! features are a subset of the device's including VERSION_1; the device is activated only
//! once between resets, with the negotiated features and every ready queue valid and flagged
//! for INDIRECT/EVENT_IDX as negotiated; `queue_notify` reaches the device only while it is
//! active and only for its queues.

#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, MMIO_MAGIC};
use smolvm::devices::virtio::{
    ActivateContext, ActivateError, QueueError, VirtioDevice, DEVICE_ID_BLOCK, STATUS_ACKNOWLEDGE,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use smolvm::devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x8000;
const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_RING_EVENT_IDX)
    | (1 << VIRTIO_F_RING_INDIRECT_DESC)
    | 1;
const SIZES: [usize; 8] = [4, 4, 4, 4, 1, 2, 8, 3];
/// Register offsets worth aiming at (byte 1 with bit 5), plus a few odd ones.
const KNOWN: [u64; 32] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0fc, 0x100,
    0x104, 0x10b, 0x071, 0x0fe, 0xfff, 0x1000,
];

#[derive(Default)]
struct Shared {
    active: Option<ActivateContext>,
    activations: u64,
    notifies: u64,
}

struct Sink(Arc<Mutex<Shared>>);

impl VirtioDevice for Sink {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 4]
    }
    fn device_features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = if at < 12 { 0xc0 | at as u8 } else { 0 };
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut s = self.0.lock().unwrap();
        assert!(s.active.is_none(), "activated twice without a reset");
        assert_eq!(ctx.features & !OFFERED, 0, "features not offered");
        assert_ne!(
            ctx.features & (1 << VIRTIO_F_VERSION_1),
            0,
            "VERSION_1 missing"
        );
        assert_eq!(ctx.queues.len(), 2);
        for q in &ctx.queues {
            assert_eq!(
                q.indirect,
                ctx.features & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0
            );
            assert_eq!(
                q.event_idx,
                ctx.features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0
            );
            if q.ready {
                assert!(q.is_valid(&ctx.mem), "ready queue failed validation: {q:?}");
            }
        }
        s.activations += 1;
        s.active = Some(ctx);
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) -> bool {
        let mut s = self.0.lock().unwrap();
        s.notifies += 1;
        let ctx = s.active.as_mut().expect("notify before activation");
        let q = ctx
            .queues
            .get_mut(usize::from(queue))
            .expect("notify of unknown queue");
        if !q.ready {
            return false;
        }
        loop {
            match q.pop(&ctx.mem) {
                Ok(Some(chain)) => {
                    let _ = q.add_used(&ctx.mem, chain.head_index(), 0);
                }
                Ok(None) => break,
                Err(e) if e.chain_head().is_some() => {
                    let head = e.chain_head().unwrap();
                    let _ = q.add_used(&ctx.mem, head, 0);
                }
                Err(QueueError::HeadOutOfRange { .. }) => continue,
                Err(_) => {
                    ctx.interrupt.set_needs_reset();
                    return false;
                }
            }
        }
        if q.needs_notification(&ctx.mem) {
            ctx.interrupt.signal_used_queue(queue);
        }
        false
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().active = None;
    }
}

fn read_u32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut v = [0u8; 4];
    t.read(0, offset, &mut v);
    u32::from_le_bytes(v)
}

fuzz_target!(|data: &[u8]| {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let irqs = Arc::new(AtomicU64::new(0));
    let mem = smolvm::memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let i = irqs.clone();
    let mut t = MmioTransport::with_trigger(
        Box::new(Sink(shared.clone())),
        mem.clone(),
        Arc::new(move || {
            i.fetch_add(1, Ordering::Relaxed);
        }),
    );
    for rec in data.chunks_exact(8) {
        let op = rec[0];
        let size = SIZES[usize::from((op >> 2) & 7)];
        let offset = if op & 0x20 != 0 {
            KNOWN[usize::from(rec[1]) % KNOWN.len()]
        } else {
            u64::from(u16::from_le_bytes([rec[1], rec[2]])) % 0x1100
        };
        match op & 3 {
            0 => {
                let mut buf = [0x5au8; 8];
                let buf = &mut buf[..size];
                t.read(0, offset, buf);
                if offset < CONFIG_SPACE_OFFSET && (size != 4 || offset % 4 != 0) {
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "{size}-byte read at {offset:#x}"
                    );
                }
            }
            1 => {
                let mut value = [0u8; 8];
                value[..5].copy_from_slice(&rec[3..8]);
                if op & 0x40 != 0 && size == 4 && offset == 0x70 {
                    let v = read_u32(&mut t, 0x70)
                        | u32::from_le_bytes([rec[3], rec[4], rec[5], rec[6]]);
                    value[..4].copy_from_slice(&v.to_le_bytes());
                }
                t.write(0, offset, &value[..size]);
            }
            2 => {
                let irq = shared
                    .lock()
                    .unwrap()
                    .active
                    .as_ref()
                    .map(|c| c.interrupt.clone());
                match rec[1] % 4 {
                    0 => irq
                        .into_iter()
                        .for_each(|i| i.signal_used_queue(u16::from(rec[2]))),
                    1 => irq.into_iter().for_each(|i| i.signal_config_change()),
                    2 => irq.into_iter().for_each(|i| i.set_needs_reset()),
                    _ => {
                        // The sink serves everything in one call: never "work left".
                        let more =
                            t.notify_queue(u32::from(rec[2]) | (u32::from(rec[3] & 1) << 16));
                        assert!(!more, "the sink never stops early");
                    }
                }
            }
            _ => {
                let addr = u64::from(u16::from_le_bytes([rec[1], rec[2]])) % MEM_SIZE as u64;
                let n = (MEM_SIZE as u64 - addr).min(4) as usize;
                mem.write_slice(&rec[3..3 + n], GuestAddress(addr)).unwrap();
            }
        }

        // Invariants after every access.
        assert_eq!(read_u32(&mut t, 0), MMIO_MAGIC);
        let state = t.state();
        let s = state.status;
        let active = shared.lock().unwrap().active.is_some();
        assert_eq!(s & STATUS_DRIVER_OK != 0, t.is_activated(), "status {s:#x}");
        assert_eq!(t.is_activated(), active, "transport and device disagree");
        if s & STATUS_DRIVER_OK != 0 {
            assert_ne!(s & STATUS_FEATURES_OK, 0);
        }
        if s & STATUS_FEATURES_OK != 0 {
            assert_eq!(
                s & (STATUS_ACKNOWLEDGE | STATUS_DRIVER),
                STATUS_ACKNOWLEDGE | STATUS_DRIVER
            );
            assert_eq!(state.driver_features & !OFFERED, 0);
            assert_ne!(state.driver_features & (1 << VIRTIO_F_VERSION_1), 0);
        }
        if s & STATUS_DRIVER != 0 {
            assert_ne!(s & STATUS_ACKNOWLEDGE, 0);
        }
        for q in &state.queues {
            assert!(q.size.is_power_of_two() && q.size <= q.max_size, "{q:?}");
        }
    }
    let s = shared.lock().unwrap();
    assert!(s.activations <= data.len() as u64 && s.notifies <= data.len() as u64);
});

//! Unit tests of the virtio-blk device, driven by a simulated Linux-style driver that lays out
//! rings, descriptor tables and requests in guest memory by hand.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::block::disk::{DiskError, DiskImage, DiskMode, OverlayTarget};
use crate::devices::virtio::queue::{
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
};
use crate::memory;

const MEM_SIZE: usize = 16 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DATA: u64 = 0x10_0000;

#[derive(Default)]
struct Irq {
    used: AtomicU32,
    config: AtomicU32,
    needs_reset: AtomicU32,
}

impl VirtioInterrupt for Irq {
    fn signal_used_queue(&self, queue: u16) {
        assert_eq!(queue, 0);
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// An in-memory disk that can be told to fail its next operation, and can refill the
/// available ring on every read (to test the per-notification budget).
struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
    fail_next: AtomicBool,
    flushes: u32,
    refill: Option<(GuestMemory, u16, AtomicU16)>,
}

impl MemDisk {
    fn new(sectors: usize) -> Self {
        MemDisk {
            data: vec![0; sectors * 512],
            read_only: false,
            fail_next: AtomicBool::new(false),
            flushes: 0,
            refill: None,
        }
    }
    fn fail(&self) -> Result<(), DiskError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(DiskError::Io(std::io::Error::other("injected failure")));
        }
        Ok(())
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn id(&self) -> [u8; DISK_ID_LEN] {
        *b"smolvm-test-serial-1"
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.fail()?;
        check_range(offset, buf.len() as u64, self.size())?;
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        if let Some((mem, head, idx)) = &self.refill {
            // The driver re-posts `head` while the device is busy.
            let i = idx.fetch_add(1, Ordering::SeqCst);
            let slot = u64::from(i % QUEUE_SIZE);
            mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            mem.write_obj(i.wrapping_add(1).to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.fail()?;
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.size())?;
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.fail()?;
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.fail()?;
        check_range(offset, len, self.size())?;
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// What the driver sees for a completed request.
#[derive(Debug)]
struct Done {
    status: Option<u8>,
    len: u32,
    data: Vec<u8>,
}

/// A buffer of a request chain: guest address, length, device-writable.
type Buf = (u64, u32, bool);

struct Harness<D: Disk> {
    mem: GuestMemory,
    dev: Block<D>,
    irq: Arc<Irq>,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
    bump: u64,
    event_idx: bool,
}

impl<D: Disk> Harness<D> {
    fn new(disk: D) -> Self {
        Self::with(disk, 256, true)
    }

    fn with(disk: D, size: u16, event_idx: bool) -> Self {
        let mem = memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut h = Harness {
            mem,
            dev: Block::new(disk),
            irq: Arc::new(Irq::default()),
            size,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
            bump: DATA,
            event_idx,
        };
        h.activate();
        h
    }

    /// Fresh rings and a fresh queue, as a driver does after a reset.
    fn activate(&mut self) {
        self.mem
            .write_slice(&[0u8; 0x4000], GuestAddress(DESC))
            .unwrap();
        self.avail_idx = 0;
        self.used_seen = 0;
        self.next_desc = 0;
        let mut q = Queue::new(QUEUE_SIZE);
        q.size = self.size;
        q.desc_table = GuestAddress(DESC);
        q.avail_ring = GuestAddress(AVAIL);
        q.used_ring = GuestAddress(USED);
        q.indirect = true;
        q.event_idx = self.event_idx;
        q.ready = true;
        assert!(q.is_valid(&self.mem));
        let mut features = self.dev.device_features();
        if !self.event_idx {
            features &= !(1 << VIRTIO_F_RING_EVENT_IDX);
        }
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues: vec![q],
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

    /// Puts a chain in the descriptor table (directly or through an indirect table) and makes
    /// it available. Returns its head.
    fn submit(&mut self, bufs: &[Buf], indirect: bool) -> u16 {
        let flags = |k: usize, w: bool| {
            (if k + 1 < bufs.len() {
                VIRTQ_DESC_F_NEXT
            } else {
                0
            }) | if w { VIRTQ_DESC_F_WRITE } else { 0 }
        };
        let head = self.next_desc;
        if indirect {
            let table = self.alloc(16 * bufs.len() as u64);
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                self.write_desc(table, k as u16, a, l, flags(k, w), k as u16 + 1);
            }
            self.write_desc(
                DESC,
                head,
                table,
                16 * bufs.len() as u32,
                VIRTQ_DESC_F_INDIRECT,
                0,
            );
            self.next_desc = (head + 1) % self.size;
        } else {
            for (k, &(a, l, w)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % self.size;
                self.write_desc(DESC, i, a, l, flags(k, w), (i + 1) % self.size);
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
        }
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The next used element `(head, len)`, asserting there is one.
    fn next_used(&mut self) -> (u16, u32) {
        assert_ne!(self.used_idx(), self.used_seen, "no used element");
        let a = USED + 4 + 8 * u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(a)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(a + 4)).unwrap();
        (id as u16, len)
    }

    fn header(&mut self, typ: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&typ.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    /// A full request: header, readable `out` segments, writable `ins` segments (lengths),
    /// a status byte; submitted, notified and completed.
    fn io(&mut self, typ: u32, sector: u64, out: &[&[u8]], ins: &[u32], indirect: bool) -> Done {
        let mut bufs = vec![(self.header(typ, sector), 16, false)];
        for o in out {
            let a = self.alloc(o.len() as u64);
            self.mem.write_slice(o, GuestAddress(a)).unwrap();
            bufs.push((a, o.len() as u32, false));
        }
        let mut in_bufs = Vec::new();
        for &l in ins {
            let a = self.alloc(u64::from(l));
            self.mem
                .write_slice(&vec![0xee; l as usize], GuestAddress(a))
                .unwrap();
            in_bufs.push((a, l));
            bufs.push((a, l, true));
        }
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        bufs.push((status, 1, true));
        self.run(&bufs, indirect, &in_bufs, Some(status))
    }

    fn run(
        &mut self,
        bufs: &[Buf],
        indirect: bool,
        ins: &[(u64, u32)],
        status: Option<u64>,
    ) -> Done {
        let head = self.submit(bufs, indirect);
        self.dev.queue_notify(0);
        let (id, len) = self.next_used();
        assert_eq!(id, head);
        assert_eq!(self.used_idx(), self.used_seen, "more than one completion");
        let mut data = Vec::new();
        for &(a, l) in ins {
            let mut v = vec![0u8; l as usize];
            self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
            data.extend(v);
        }
        let status = status.map(|a| self.mem.read_obj::<u8>(GuestAddress(a)).unwrap());
        Done { status, len, data }
    }

    fn read(&mut self, sector: u64, segs: &[u32]) -> Done {
        self.io(VIRTIO_BLK_T_IN, sector, &[], segs, false)
    }

    fn write(&mut self, sector: u64, data: &[u8], segs: &[usize]) -> Done {
        let mut out = Vec::new();
        let mut pos = 0;
        for &s in segs {
            out.push(&data[pos..pos + s]);
            pos += s;
        }
        assert_eq!(pos, data.len());
        self.io(VIRTIO_BLK_T_OUT, sector, &out, &[], false)
    }

    fn zero_req(&mut self, typ: u32, segs: &[(u64, u32, u32)]) -> Done {
        let mut payload = Vec::new();
        for &(s, n, f) in segs {
            payload.extend(s.to_le_bytes());
            payload.extend(n.to_le_bytes());
            payload.extend(f.to_le_bytes());
        }
        self.io(typ, 0, &[&payload], &[], false)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const OK: Option<u8> = Some(VIRTIO_BLK_S_OK);
const IOERR: Option<u8> = Some(VIRTIO_BLK_S_IOERR);
const UNSUPP: Option<u8> = Some(VIRTIO_BLK_S_UNSUPP);

#[test]
fn read_write_round_trip_with_many_segment_layouts() {
    let mut h = Harness::new(MemDisk::new(256));
    let layouts: &[&[usize]] = &[
        &[512],
        &[4096],
        &[512, 512],
        &[100, 924],
        &[1, 511, 512, 1000, 24],
        &[300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 1024, 584],
    ];
    for (k, layout) in layouts.iter().enumerate() {
        let total: usize = layout.iter().sum();
        assert_eq!(total % 512, 0, "layout {k}");
        let data = pattern(total, k as u8);
        let sector = 7 * k as u64;
        let w = h.write(sector, &data, layout);
        assert_eq!((w.status, w.len), (OK, 1), "write layout {k}");
        assert_eq!(
            &h.dev.disk().data[sector as usize * 512..][..total],
            &data[..]
        );
        // Read back with the layout reversed (different segment boundaries).
        let segs: Vec<u32> = layout.iter().rev().map(|&s| s as u32).collect();
        let r = h.read(sector, &segs);
        assert_eq!((r.status, r.len), (OK, total as u32 + 1), "read layout {k}");
        assert_eq!(r.data, data, "layout {k}");
    }
    let s = h.dev.stats();
    assert_eq!((s.reads, s.writes, s.io_errors), (6, 6, 0));
    assert_eq!(s.bytes_read, s.bytes_written);
}

#[test]
fn large_requests_cross_the_bounce_buffer() {
    let mut h = Harness::new(MemDisk::new(8192));
    let data = pattern(3 << 20, 9);
    let w = h.write(100, &data, &[1 << 20, 1 << 20, (1 << 20) - 512, 512]);
    assert_eq!(w.status, OK);
    let r = h.read(100, &[(3 << 20) - 4096, 4096]);
    assert_eq!((r.status, r.len), (OK, (3 << 20) + 1));
    assert!(r.data == data);
}

#[test]
fn indirect_descriptors() {
    let mut h = Harness::new(MemDisk::new(64));
    let data = pattern(2048, 3);
    let w = h.io(
        VIRTIO_BLK_T_OUT,
        4,
        &[&data[..1000], &data[1000..]],
        &[],
        true,
    );
    assert_eq!((w.status, w.len), (OK, 1));
    let r = h.io(VIRTIO_BLK_T_IN, 4, &[], &[1536, 512], true);
    assert_eq!((r.status, r.len), (OK, 2049));
    assert_eq!(r.data, data);
}

#[test]
fn flush_reaches_the_disk() {
    let mut h = Harness::new(MemDisk::new(8));
    let f = h.io(VIRTIO_BLK_T_FLUSH, 0, &[], &[], false);
    assert_eq!((f.status, f.len), (OK, 1));
    assert_eq!(h.dev.disk().flushes, 1);
    assert_eq!(h.dev.stats().flushes, 1);
}

#[test]
fn get_id_full_truncated_and_empty() {
    let mut h = Harness::new(MemDisk::new(8));
    let full = h.io(VIRTIO_BLK_T_GET_ID, 0, &[], &[20], false);
    assert_eq!((full.status, full.len), (OK, 21));
    assert_eq!(&full.data, b"smolvm-test-serial-1");
    let long = h.io(VIRTIO_BLK_T_GET_ID, 0, &[], &[64], false);
    assert_eq!((long.status, long.len), (OK, 21));
    assert_eq!(&long.data[..20], b"smolvm-test-serial-1");
    assert!(long.data[20..].iter().all(|&b| b == 0xee)); // untouched
    let short = h.io(VIRTIO_BLK_T_GET_ID, 0, &[], &[3, 5], false);
    assert_eq!((short.status, short.len), (OK, 9));
    assert_eq!(&short.data, b"smolvm-t");
    let empty = h.io(VIRTIO_BLK_T_GET_ID, 0, &[], &[], false);
    assert_eq!((empty.status, empty.len), (IOERR, 1));
    assert_eq!(h.dev.stats().get_ids, 4);
}

#[test]
fn discard_and_write_zeroes_read_back_zero() {
    let mut h = Harness::new(MemDisk::new(64));
    let data = pattern(64 * 512, 1);
    assert_eq!(h.write(0, &data, &[64 * 512]).status, OK);
    let d = h.zero_req(VIRTIO_BLK_T_DISCARD, &[(2, 3, 0)]);
    assert_eq!((d.status, d.len), (OK, 1));
    let z = h.zero_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(10, 1, 0)]);
    assert_eq!(z.status, OK);
    let zu = h.zero_req(
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(20, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );
    assert_eq!(zu.status, OK);
    let r = h.read(0, &[64 * 512]);
    for s in 0..64usize {
        let got = &r.data[s * 512..][..512];
        let zero = (2..5).contains(&s) || s == 10 || (20..28).contains(&s);
        if zero {
            assert!(got.iter().all(|&b| b == 0), "sector {s}");
        } else {
            assert_eq!(got, &data[s * 512..][..512], "sector {s}");
        }
    }
    // Refused forms.
    let unmap_discard = h.zero_req(
        VIRTIO_BLK_T_DISCARD,
        &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );
    assert_eq!(unmap_discard.status, UNSUPP);
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]).status,
        UNSUPP
    );
    let two = h.zero_req(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0), (4, 1, 0)]);
    assert_eq!(two.status, IOERR); // max_discard_seg = 1
    assert_eq!(h.zero_req(VIRTIO_BLK_T_DISCARD, &[]).status, IOERR);
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_DISCARD, &[(63, 2, 0)]).status,
        IOERR
    );
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX / 256, 1, 0)])
            .status,
        IOERR
    );
    // Payload not a multiple of 16 bytes.
    let odd = h.io(VIRTIO_BLK_T_DISCARD, 0, &[&[0u8; 20]], &[], false);
    assert_eq!(odd.status, IOERR);
    let s = h.dev.stats();
    assert_eq!((s.discards, s.write_zeroes, s.unsupported), (6, 4, 2));
}

#[test]
fn discard_not_negotiated_is_unsupported() {
    let mut h = Harness::new(MemDisk::new(8));
    h.dev.reset();
    // Re-activate without DISCARD / WRITE_ZEROES.
    let mut q = Queue::new(QUEUE_SIZE);
    (q.size, q.ready) = (256, true);
    (q.desc_table, q.avail_ring, q.used_ring) =
        (GuestAddress(DESC), GuestAddress(AVAIL), GuestAddress(USED));
    let features =
        h.dev.device_features() & !(1 << VIRTIO_BLK_F_DISCARD) & !(1 << VIRTIO_BLK_F_WRITE_ZEROES);
    h.dev
        .activate(ActivateContext {
            mem: h.mem.clone(),
            queues: vec![q],
            features,
            interrupt: h.irq.clone(),
        })
        .unwrap();
    (h.avail_idx, h.used_seen, h.next_desc) = (0, 0, 0);
    h.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).status,
        UNSUPP
    );
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).status,
        UNSUPP
    );
}

#[test]
fn read_only_disk_offers_ro_and_rejects_writes() {
    let mut disk = MemDisk::new(16);
    disk.data[..512].fill(7);
    disk.read_only = true;
    let mut h = Harness::new(disk);
    let f = h.dev.device_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut cfg = [0u8; 4];
    h.dev.read_config(36, &mut cfg);
    assert_eq!(cfg, [0; 4]); // no discard limits
    assert_eq!(h.write(0, &[1; 512], &[512]).status, IOERR);
    assert_eq!(h.zero_req(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).status, IOERR);
    assert_eq!(
        h.zero_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).status,
        IOERR
    );
    let r = h.read(0, &[512]);
    assert_eq!(r.status, OK);
    assert!(r.data.iter().all(|&b| b == 7));
    assert_eq!(h.dev.stats().io_errors, 3);
}

fn temp_image(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "smolvm-blkdev-{name}-{}-{:?}.img",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn read_only_disk_image() {
    let base = temp_image("ro", &pattern(8192, 5));
    let disk = DiskImage::open(&base, DiskMode::ReadOnly).unwrap();
    let mut h = Harness::new(disk);
    assert_ne!(h.dev.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.write(1, &[1; 512], &[512]).status, IOERR);
    let r = h.read(0, &[8192]);
    assert_eq!(r.data, pattern(8192, 5));
    drop(h);
    std::fs::remove_file(&base).unwrap();
}

#[test]
fn overlay_disk_keeps_the_base_unchanged() {
    let original = pattern(64 * 1024, 11);
    let base = temp_image("overlay", &original);
    let disk = DiskImage::open(&base, DiskMode::Overlay(OverlayTarget::Memory)).unwrap();
    let mut h = Harness::new(disk);
    assert_eq!(h.dev.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let new = pattern(3 * 512, 99);
    assert_eq!(h.write(5, &new, &[700, 836]).status, OK);
    assert_eq!(h.zero_req(VIRTIO_BLK_T_DISCARD, &[(40, 16, 0)]).status, OK);
    assert_eq!(h.io(VIRTIO_BLK_T_FLUSH, 0, &[], &[], false).status, OK);
    let r = h.read(0, &[64 * 1024]);
    let mut expect = original.clone();
    expect[5 * 512..8 * 512].copy_from_slice(&new);
    expect[40 * 512..56 * 512].fill(0);
    assert!(r.data == expect);
    drop(h);
    assert!(std::fs::read(&base).unwrap() == original);
    std::fs::remove_file(&base).unwrap();
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = Harness::new(MemDisk::new(8));
    for t in [2, 3, 5, 10, 14, 99, u32::MAX] {
        let d = h.io(t, 0, &[], &[512], false);
        assert_eq!((d.status, d.len), (UNSUPP, 1), "type {t}");
    }
    assert_eq!(h.dev.stats().unsupported, 7);
}

#[test]
fn out_of_range_sectors_fail() {
    let mut h = Harness::new(MemDisk::new(16));
    assert_eq!(h.read(15, &[512]).status, OK);
    for (sector, len) in [
        (16, 512),
        (15, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512 + 1, 512),
    ] {
        let r = h.read(sector, &[len]);
        assert_eq!((r.status, r.len), (IOERR, 1), "read {sector} {len}");
        let w = h.write(sector, &vec![1; len as usize], &[len as usize]);
        assert_eq!(w.status, IOERR, "write {sector} {len}");
    }
    assert!(h.dev.disk().data.iter().all(|&b| b == 0));
}

#[test]
fn bad_lengths_fail() {
    let mut h = Harness::new(MemDisk::new(64));
    assert_eq!(h.read(0, &[700]).status, IOERR);
    assert_eq!(h.read(0, &[100, 100]).status, IOERR);
    assert_eq!(h.write(0, &[1; 100], &[100]).status, IOERR);
    assert_eq!(h.write(0, &[1; 513], &[513]).status, IOERR);
    // More than MAX_REQUEST_BYTES: 17 overlapping 15 MiB buffers (255 MiB).
    let mut bufs = vec![(h.header(VIRTIO_BLK_T_IN, 0), 16, false)];
    for _ in 0..17 {
        bufs.push((0, 15 << 20, true));
    }
    let status = h.alloc(1);
    bufs.push((status, 1, true));
    let d = h.run(&bufs, false, &[], Some(status));
    assert_eq!((d.status, d.len), (IOERR, 1));
    assert!(h.dev.disk().data.iter().all(|&b| b == 0));
}

#[test]
fn malformed_chains() {
    let mut h = Harness::new(MemDisk::new(64));
    // No writable byte: no status to write, used length 0.
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.alloc(512);
    let d = h.run(&[(hdr, 16, false), (data, 512, false)], false, &[], None);
    assert_eq!(d.len, 0);
    // Header only.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(h.run(&[(hdr, 16, false)], false, &[], None).len, 0);
    // Header too short (8 bytes) with a status byte.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let st = h.alloc(1);
    let d = h.run(&[(hdr, 8, false), (st, 1, true)], false, &[], Some(st));
    assert_eq!((d.status, d.len), (IOERR, 1));
    // Writable header: everything device-writable.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(512);
    let st = h.alloc(1);
    let d = h.run(
        &[(hdr, 16, true), (data, 512, true), (st, 1, true)],
        false,
        &[],
        Some(st),
    );
    assert_eq!((d.status, d.len), (IOERR, 1));
    assert_eq!(h.dev.stats().malformed_chains, 2);
    // A chain error from the queue (descriptor loop) is returned with length 0 ...
    let head = h.next_desc;
    h.write_desc(DESC, head, DATA, 16, VIRTQ_DESC_F_NEXT, head);
    h.next_desc += 1;
    h.publish(head);
    h.dev.queue_notify(0);
    assert_eq!(h.next_used(), (head, 0));
    // ... and the device carries on.
    assert_eq!(h.read(0, &[512]).status, OK);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn avail_index_jump_needs_reset() {
    let mut h = Harness::new(MemDisk::new(64));
    h.mem.write_obj(300u16, GuestAddress(AVAIL + 2)).unwrap();
    h.dev.queue_notify(0);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 1);
    assert!(h.dev.state().needs_reset);
    h.dev.queue_notify(0); // ignored until reset
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 1);
    assert_eq!(h.used_idx(), 0);
    h.dev.reset();
    h.activate();
    assert!(!h.dev.state().needs_reset);
    assert_eq!(h.read(0, &[512]).status, OK);
}

#[test]
fn reset_in_the_middle_of_io() {
    let mut h = Harness::new(MemDisk::new(64));
    let data = pattern(512, 4);
    assert_eq!(h.write(1, &data, &[512]).status, OK);
    // Submit requests, reset before the device sees them, then a fresh queue.
    let hdr = h.header(VIRTIO_BLK_T_OUT, 2);
    let st = h.alloc(1);
    h.submit(
        &[(hdr, 16, false), (DATA, 512, false), (st, 1, true)],
        false,
    );
    h.submit(
        &[(hdr, 16, false), (DATA, 512, false), (st, 1, true)],
        false,
    );
    h.dev.reset();
    assert!(!h.dev.state().activated);
    h.dev.queue_notify(0); // after reset: nothing happens
    assert!(h.dev.disk().data[1024..1536].iter().all(|&b| b == 0));
    h.activate();
    assert_eq!(h.dev.state().queue.as_ref().unwrap().next_avail, 0);
    let r = h.read(1, &[512]);
    assert_eq!((r.status, r.data), (OK, data));
}

#[test]
fn activate_needs_a_ready_queue() {
    let mut dev = Block::new(MemDisk::new(8));
    let mem = memory::create(&[(GuestAddress(0), 0x10000)]).unwrap();
    let r = dev.activate(ActivateContext {
        mem,
        queues: vec![Queue::new(QUEUE_SIZE)],
        features: dev.device_features(),
        interrupt: Arc::new(Irq::default()),
    });
    assert_eq!(r, Err(ActivateError::QueueNotReady(0)));
    assert!(!dev.state().activated);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = Harness::with(MemDisk::new(64), 16, true);
    let irqs = |h: &Harness<MemDisk>| h.irq.used.load(Ordering::SeqCst);
    assert_eq!(h.read(0, &[512]).status, OK);
    assert_eq!(irqs(&h), 1); // the first completion always interrupts
                             // avail_event published: the driver should notify for entry 1 onwards.
    let avail_event: u16 = h.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
    assert_eq!(avail_event, 1);
    // The driver wants an interrupt only once entry 3 is used.
    h.mem
        .write_obj(3u16, GuestAddress(AVAIL + 4 + 2 * 16))
        .unwrap();
    h.read(0, &[512]);
    assert_eq!(irqs(&h), 1);
    h.read(0, &[512]);
    assert_eq!(irqs(&h), 1);
    h.read(0, &[512]);
    assert_eq!(irqs(&h), 2);
    // A batch of requests in one notification: one interrupt.
    h.mem
        .write_obj(4u16, GuestAddress(AVAIL + 4 + 2 * 16))
        .unwrap();
    let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let st = h.alloc(1);
    for _ in 0..5 {
        h.submit(&[(hdr, 16, false), (st, 1, true)], false);
    }
    h.dev.queue_notify(0);
    assert_eq!(h.used_idx(), 9);
    assert_eq!(irqs(&h), 3);
}

#[test]
fn without_event_idx_every_batch_interrupts_unless_suppressed() {
    let mut h = Harness::with(MemDisk::new(64), 16, false);
    let irqs = |h: &Harness<MemDisk>| h.irq.used.load(Ordering::SeqCst);
    for n in 1..=3 {
        assert_eq!(h.read(0, &[512]).status, OK);
        assert_eq!(irqs(&h), n);
    }
    // Notifications re-enabled after processing.
    let used_flags: u16 = h.mem.read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(used_flags & VIRTQ_USED_F_NO_NOTIFY, 0);
    h.mem
        .write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
        .unwrap();
    h.read(0, &[512]);
    h.read(0, &[512]);
    assert_eq!(irqs(&h), 3);
}

#[test]
fn work_per_notification_is_bounded() {
    let mut h = Harness::new(MemDisk::new(64));
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let data = h.alloc(512);
    let st = h.alloc(1);
    let head = h.submit(&[(hdr, 16, false), (data, 512, true), (st, 1, true)], false);
    // The "driver" re-posts the chain on every disk read: an endless stream.
    let mem = h.mem.clone();
    h.dev.disk.refill = Some((mem, head, AtomicU16::new(1)));
    assert!(
        h.dev.process_queue(),
        "stopped at the budget with work left"
    );
    assert_eq!(h.used_idx() as usize, MAX_REQUESTS_PER_NOTIFY);
    assert_eq!(h.irq.used.load(Ordering::SeqCst), 1);
    h.dev.disk.refill = None;
    assert!(!h.dev.process_queue());
    assert_eq!(h.used_idx() as usize, MAX_REQUESTS_PER_NOTIFY + 1);
    assert_eq!(h.dev.stats().reads as usize, MAX_REQUESTS_PER_NOTIFY + 1);
}

#[test]
fn config_space_layout() {
    let dev = Block::new(MemDisk::new(1000));
    let u32_at = |off: u64| {
        let mut b = [0u8; 4];
        dev.read_config(off, &mut b);
        u32::from_le_bytes(b)
    };
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1000);
    assert_eq!(u32_at(8), SIZE_MAX);
    assert_eq!(u32_at(12), SEG_MAX);
    assert!(SEG_MAX <= u32::from(QUEUE_SIZE) - 2);
    assert_eq!(u32_at(16), 0); // geometry
    assert_eq!(u32_at(20), 512);
    assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(40), 1);
    assert_eq!(u32_at(44), 8);
    assert_eq!(u32_at(48), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(52), 1);
    assert_eq!(u32_at(56), 1); // write_zeroes_may_unmap + padding
    assert_eq!(u32_at(60), 0);
    assert_eq!(u32_at(0x1000), 0);
    let mut b = [0xffu8; 8];
    dev.read_config(u64::MAX - 2, &mut b);
    assert_eq!(b, [0; 8]);
    // Unaligned, straddling the end.
    let mut b = [0xffu8; 4];
    dev.read_config(58, &mut b);
    assert_eq!(b, [0; 4]);
    let f = dev.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_INDIRECT_DESC,
        VIRTIO_F_RING_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
}

#[test]
fn host_io_error_fails_only_that_request() {
    let mut h = Harness::new(MemDisk::new(64));
    h.dev.disk.fail_next.store(true, Ordering::SeqCst);
    let r = h.read(0, &[512]);
    assert_eq!((r.status, r.len), (IOERR, 1));
    assert_eq!(h.read(0, &[512]).status, OK);
    h.dev.disk.fail_next.store(true, Ordering::SeqCst);
    assert_eq!(h.write(0, &[3; 512], &[512]).status, IOERR);
    assert_eq!(h.write(0, &[3; 512], &[512]).status, OK);
    h.dev.disk.fail_next.store(true, Ordering::SeqCst);
    assert_eq!(h.io(VIRTIO_BLK_T_FLUSH, 0, &[], &[], false).status, IOERR);
    assert_eq!(h.io(VIRTIO_BLK_T_FLUSH, 0, &[], &[], false).status, OK);
    h.dev.disk.fail_next.store(true, Ordering::SeqCst);
    assert_eq!(h.zero_req(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).status, IOERR);
    assert_eq!(h.zero_req(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).status, OK);
    assert_eq!(h.dev.stats().io_errors, 4);
    assert_eq!(h.irq.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn write_config_is_ignored_and_state_reports_queue() {
    let mut h = Harness::new(MemDisk::new(8));
    h.dev.write_config(0, &[0xff; 8]);
    let mut cap = [0u8; 8];
    h.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    assert_eq!(h.read(0, &[512]).status, OK);
    let s = h.dev.state();
    assert!(s.activated);
    assert_eq!(s.acked_features, h.dev.device_features());
    let q = s.queue.unwrap();
    assert_eq!((q.next_avail, q.next_used), (1, 1));
    assert_eq!(h.irq.config.load(Ordering::SeqCst), 0);
    assert!(format!("{:?}", h.dev).contains("Block"));
}

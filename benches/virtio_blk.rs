//! virtio-blk device throughput with a simulated driver: requests laid out in guest memory the
//! way Linux's virtio_blk does (16-byte header, data segments, 1-byte status), made available,
//! notified and completed through `VirtioDevice::queue_notify`, against a page-cached temp file
//! (`DiskMode::ReadWrite`, 256 MiB, written once before measuring so reads hit the page cache).
//!
//! - `4k_randread_qd1` / `4k_randread_qd32`: 4 KiB reads at random 4 KiB-aligned offsets, 1 or
//!   32 requests per notification (criterion's elements/s = IOPS).
//! - `1m_seqread` / `1m_seqwrite`: 1 MiB requests (16 segments of 64 KiB) at sequential offsets
//!   (criterion's bytes/s).
//!
//! Run with `cargo bench --bench virtio_blk`. Needs no KVM.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress};

use smolvm::devices::virtio::block::{
    Block, DiskImage, DiskMode, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use smolvm::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use smolvm::devices::virtio::{ActivateContext, Queue, VirtioDevice, VirtioInterrupt};
use smolvm::memory::{self, GuestMemory};

const SIZE: u16 = 256;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x11_0000;
const USED: u64 = 0x12_0000;
const HDRS: u64 = 0x13_0000;
const DATA: u64 = 0x20_0000;
const DISK_LEN: u64 = 256 << 20;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

struct Driver {
    mem: GuestMemory,
    dev: Block<DiskImage>,
    heads: Vec<u16>,
    avail_idx: u16,
}

fn write_desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
        .unwrap();
}

impl Driver {
    /// `chains` requests of `segs` data segments of `seg_len` bytes each, writable for reads.
    fn new(disk: DiskImage, chains: u16, segs: u16, seg_len: u32, read: bool) -> Driver {
        let mem = memory::create(&[(GuestAddress(0), 128 << 20)]).unwrap();
        let per = segs + 2;
        let chain_bytes = u64::from(segs) * u64::from(seg_len);
        let mut heads = Vec::new();
        for c in 0..chains {
            let i = c * per;
            write_desc(
                &mem,
                i,
                HDRS + 32 * u64::from(c),
                16,
                VIRTQ_DESC_F_NEXT,
                i + 1,
            );
            for s in 0..segs {
                let addr = DATA + u64::from(c) * chain_bytes + u64::from(s) * u64::from(seg_len);
                let w = if read { VIRTQ_DESC_F_WRITE } else { 0 };
                write_desc(
                    &mem,
                    i + 1 + s,
                    addr,
                    seg_len,
                    VIRTQ_DESC_F_NEXT | w,
                    i + 2 + s,
                );
            }
            let status = HDRS + 32 * u64::from(c) + 16;
            write_desc(&mem, i + 1 + segs, status, 1, VIRTQ_DESC_F_WRITE, 0);
            heads.push(i);
        }
        let mut dev = Block::new(disk);
        let mut q = Queue::new(SIZE);
        q.desc_table = GuestAddress(DESC);
        q.avail_ring = GuestAddress(AVAIL);
        q.used_ring = GuestAddress(USED);
        q.event_idx = true;
        q.indirect = true;
        q.ready = true;
        assert!(q.is_valid(&mem));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![q],
            features: dev.device_features(),
            interrupt: Arc::new(NoIrq),
        })
        .unwrap();
        Driver {
            mem,
            dev,
            heads,
            avail_idx: 0,
        }
    }

    /// Submits every chain, chain `c` at `sectors[c]`, notifies once and checks completion.
    fn round(&mut self, typ: u32, sectors: &[u64]) {
        for (c, &sector) in sectors.iter().enumerate() {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&typ.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&h, GuestAddress(HDRS + 32 * c as u64))
                .unwrap();
            let slot = u64::from(self.avail_idx % SIZE);
            self.mem
                .write_obj(self.heads[c].to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        self.dev.queue_notify(0);
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, self.avail_idx);
        let status: u8 = self.mem.read_obj(GuestAddress(HDRS + 16)).unwrap();
        assert_eq!(status, 0);
    }
}

fn disk_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("smolvm-bench-blk-{}.img", std::process::id()));
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7) as u8).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..DISK_LEN >> 20 {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    path
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bench(c: &mut Criterion) {
    let path = disk_file();
    let open = || DiskImage::open(&path, DiskMode::ReadWrite).unwrap();
    let mut g = c.benchmark_group("virtio_blk");

    for qd in [1u16, 32] {
        let mut d = Driver::new(open(), qd, 1, 4096, true);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut sectors = vec![0u64; usize::from(qd)];
        g.throughput(Throughput::Elements(u64::from(qd)));
        g.bench_function(format!("4k_randread_qd{qd}"), |b| {
            b.iter(|| {
                for s in sectors.iter_mut() {
                    *s = (rng.next() % (DISK_LEN / 4096)) * 8;
                }
                d.round(VIRTIO_BLK_T_IN, &sectors);
            })
        });
    }

    for (name, typ, read) in [
        ("1m_seqread", VIRTIO_BLK_T_IN, true),
        ("1m_seqwrite", VIRTIO_BLK_T_OUT, false),
    ] {
        let mut d = Driver::new(open(), 1, 16, 64 << 10, read);
        let mut pos = 0u64;
        g.throughput(Throughput::Bytes(1 << 20));
        g.bench_function(name, |b| {
            b.iter(|| {
                d.round(typ, &[pos / 512]);
                pos = (pos + (1 << 20)) % DISK_LEN;
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench);
criterion_main!(benches);

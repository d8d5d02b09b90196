//! Split-virtqueue device-side throughput: `pop` + `add_used` of the virtio-blk request shape
//! (a 16-byte readable header, a 4 KiB writable data buffer, a 1-byte writable status), with
//! the header read and the status written through the chain helpers, as a block device does.
//!
//! Run with `cargo bench --bench virtqueue`. Needs no KVM. Criterion reports the time per
//! request; requests per second per queue = 1 / that time.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress};

use smolvm::devices::virtio::queue::{Queue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use smolvm::memory::{self, GuestMemory};

const SIZE: u16 = 256;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x11_0000;
const USED: u64 = 0x12_0000;
const DATA: u64 = 0x20_0000;

fn write_desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
        .unwrap();
}

/// Guest memory with SIZE / 3 blk-shaped chains in the descriptor table and a queue set up on it.
fn setup() -> (GuestMemory, Queue, Vec<u16>) {
    let mem = memory::create(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut heads = Vec::new();
    for c in 0..SIZE / 3 {
        let i = 3 * c;
        let data = DATA + u64::from(c) * 0x2000;
        write_desc(&mem, i, data, 16, VIRTQ_DESC_F_NEXT, i + 1);
        write_desc(
            &mem,
            i + 1,
            data + 0x1000,
            4096,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            i + 2,
        );
        write_desc(&mem, i + 2, data + 0x100, 1, VIRTQ_DESC_F_WRITE, 0);
        heads.push(i);
    }
    let mut q = Queue::new(SIZE);
    q.desc_table = GuestAddress(DESC);
    q.avail_ring = GuestAddress(AVAIL);
    q.used_ring = GuestAddress(USED);
    q.event_idx = true;
    q.ready = true;
    assert!(q.is_valid(&mem));
    (mem, q, heads)
}

fn bench(c: &mut Criterion) {
    let (mem, mut q, heads) = setup();
    let mut avail_idx = 0u16;
    let mut next_head = 0usize;
    let mut g = c.benchmark_group("virtqueue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("blk_request_pop_add_used", |b| {
        b.iter(|| {
            // Driver: publish one chain.
            let head = heads[next_head % heads.len()];
            next_head += 1;
            let slot = u64::from(avail_idx % SIZE);
            mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            avail_idx = avail_idx.wrapping_add(1);
            mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
            // Device: pop, parse the header, write the status, complete.
            let chain = q.pop(&mem).unwrap().unwrap();
            let mut hdr = [0u8; 16];
            chain.read_exact_at(&mem, 0, &mut hdr).unwrap();
            chain.write_all_at(&mem, 4096, &[0]).unwrap();
            q.add_used(&mem, chain.head_index(), 4097).unwrap();
            std::hint::black_box(q.needs_notification(&mem));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

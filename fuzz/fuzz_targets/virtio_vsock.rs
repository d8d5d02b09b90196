//! The virtio-vsock device (`devices::virtio::vsock::Vsock`) fed tx packets and descriptor
//! chains made of fuzz bytes, with in-process listeners on the host side so guest REQUESTs
//! become real connections (socketpairs) whose host ends the input can write to or close.
//!
//! Guest memory is one 1 MiB region; rx (queue 0), tx (1) and event (2) rings of 16 entries
//! live at 0x0000 / 0x4000 / 0x8000 (descriptors, avail at +0x1000, used at +0x2000), packet
//! buffers from 0x10000. The input is:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bit 0: EVENT_IDX negotiated; bit 1: INDIRECT_DESC negotiated |
//! | 1.. | operations: one opcode byte, then its operands |
//!
//! Opcodes (low 3 bits): 0 = a tx packet: a 44-byte header taken from the input (bit 3 of
//! the opcode forces a valid src/dst CID and STREAM type, so the connection state machine is
//! reached; bits 4-5 pick the op 1-4 or RW), a payload-length byte and the payload, laid out in
//! one or two descriptors, then a tx notification; 1 = raw bytes over the tx descriptor table
//! and ring, `avail.idx` bumped by 1-8, notify (hostile chains); 2 = post 1-8 rx buffers of
//! an input-chosen size and notify rx; 3 = device reset and re-activation; 4 = serve host
//! events; 5 = accept pending guest connections and write input bytes into one; 6 = close a
//! host end (peer disconnect) or half-close it; 7 = set the rx ring's used ring to garbage
//! (the device must not trust it).
//!
//! Checks: no panic, no hang (every call is bounded); every rx used length is at most that
//! buffer's size and 0 or at least a header; connections never exceed `MAX_CONNECTIONS`.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::vsock::packet::{HDR_LEN, VSOCK_HOST_CID, VSOCK_TYPE_STREAM};
use smolvm::devices::virtio::vsock::{Vsock, VsockConfig, VsockListener, MAX_CONNECTIONS};
use smolvm::devices::virtio::{
    ActivateContext, HostInterest, Queue, VirtioDevice, VirtioInterrupt, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const SIZE: u16 = 16;
const CID: u64 = 3;
const DATA: u64 = 0x1_0000;
const MAX_OPS: usize = 256;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _queue: u16) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

fn base(q: u64) -> u64 {
    q * 0x4000
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

struct Guest {
    mem: GuestMemoryMmap<()>,
    avail: [u16; 3],
    /// Rx buffer sizes by descriptor index, for the used-length check.
    rx_len: [u32; SIZE as usize],
    /// Rx descriptors the device owns (published, not yet returned). Like a real driver, the
    /// harness never rewrites one of those: the device may already hold it (its length read at
    /// pop time), and a used length checked against the rewritten size would be a false alarm.
    rx_outstanding: [bool; SIZE as usize],
    used_seen: u16,
    tx_n: u16,
    features: u64,
}

impl Guest {
    fn activate(&mut self, dev: &mut Vsock) {
        self.mem
            .write_slice(&[0u8; 0xc000], GuestAddress(0))
            .unwrap();
        self.avail = [0; 3];
        self.used_seen = 0;
        self.rx_outstanding = [false; SIZE as usize];
        let queues = (0..3)
            .map(|i| {
                let mut q = Queue::new(256);
                q.size = SIZE;
                q.desc_table = GuestAddress(base(i));
                q.avail_ring = GuestAddress(base(i) + 0x1000);
                q.used_ring = GuestAddress(base(i) + 0x2000);
                q.event_idx = self.features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
                q.indirect = self.features & (1 << VIRTIO_F_RING_INDIRECT_DESC) != 0;
                q.ready = true;
                q
            })
            .collect();
        dev.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            features: self.features,
            interrupt: Arc::new(NoIrq),
        })
        .unwrap();
    }

    fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(base(q) + 16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = u64::from(self.avail[q] % SIZE);
        let ring = base(q as u64) + 0x1000;
        self.mem
            .write_obj(head.to_le(), GuestAddress(ring + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q].to_le(), GuestAddress(ring + 2))
            .unwrap();
    }

    /// Checks the rx used entries the device published since the last call.
    fn check_rx(&mut self) {
        let used: u16 = self.mem.read_obj(GuestAddress(base(0) + 0x2002)).unwrap();
        while self.used_seen != used {
            let slot = u64::from(self.used_seen % SIZE);
            let e = base(0) + 0x2004 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            if let Some(&size) = self.rx_len.get(id as usize) {
                assert!(len <= size, "rx used length {len} > buffer {size}");
                assert!(len == 0 || len >= HDR_LEN as u32, "rx used length {len}");
                self.rx_outstanding[id as usize] = false;
            }
            self.used_seen = self.used_seen.wrapping_add(1);
        }
    }
}

fn pump(dev: &mut Vsock) {
    for _ in 0..64 {
        if !dev.host_event(0, HostInterest::READABLE) {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(flags) = input.byte() else { return };
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut dev = Vsock::new(VsockConfig::new(CID)).unwrap();
    let host = dev.host();
    let listeners: Vec<VsockListener> = (1..=4).map(|p| host.listen(p).unwrap()).collect();
    let mut peers: Vec<UnixStream> = Vec::new();
    let mut features = dev.device_features();
    if flags & 1 == 0 {
        features &= !(1 << VIRTIO_F_RING_EVENT_IDX);
    }
    if flags & 2 == 0 {
        features &= !(1 << VIRTIO_F_RING_INDIRECT_DESC);
    }
    let mut g = Guest {
        mem,
        avail: [0; 3],
        rx_len: [0; SIZE as usize],
        rx_outstanding: [false; SIZE as usize],
        used_seen: 0,
        tx_n: 0,
        features,
    };
    g.activate(&mut dev);

    for _ in 0..MAX_OPS {
        let Some(op) = input.byte() else { break };
        match op & 7 {
            0 => {
                let mut h = [0u8; HDR_LEN];
                let src = input.take(HDR_LEN);
                h[..src.len()].copy_from_slice(src);
                if op & 8 != 0 {
                    h[0..8].copy_from_slice(&CID.to_le_bytes());
                    h[8..16].copy_from_slice(&VSOCK_HOST_CID.to_le_bytes());
                    h[28..30].copy_from_slice(&VSOCK_TYPE_STREAM.to_le_bytes());
                    let o = [1u16, 2, 3, 5][usize::from((op >> 4) & 3)];
                    let o = if op & 0x40 != 0 && o == 3 { 4 } else { o };
                    h[30..32].copy_from_slice(&o.to_le_bytes());
                    // Small ports so packets meet the listeners and each other.
                    let (src, dst) = (u32::from(h[16] & 7), u32::from(h[20] & 7));
                    h[16..20].copy_from_slice(&src.to_le_bytes());
                    h[20..24].copy_from_slice(&dst.to_le_bytes());
                }
                let plen = usize::from(input.byte().unwrap_or(0));
                let payload = input.take(plen).to_vec();
                if op & 8 != 0 {
                    h[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                }
                let slot = g.tx_n % (SIZE / 2);
                g.tx_n = g.tx_n.wrapping_add(1);
                let addr = DATA + u64::from(slot) * 0x1000;
                g.mem.write_slice(&h, GuestAddress(addr)).unwrap();
                g.mem
                    .write_slice(&payload, GuestAddress(addr + 0x100))
                    .unwrap();
                let (d0, d1) = (2 * slot, 2 * slot + 1);
                if payload.is_empty() {
                    g.desc(1, d0, addr, HDR_LEN as u32, 0, 0);
                } else {
                    g.desc(1, d0, addr, HDR_LEN as u32, 1, d1);
                    g.desc(1, d1, addr + 0x100, payload.len() as u32, 0, 0);
                }
                g.publish(1, d0);
                while dev.queue_notify(1) {}
            }
            1 => {
                let n = 1 + u16::from(input.byte().unwrap_or(0) & 7);
                let raw = input.take(0x100);
                g.mem.write_slice(raw, GuestAddress(base(1))).unwrap();
                let ring = input.take(2 * usize::from(SIZE));
                g.mem
                    .write_slice(ring, GuestAddress(base(1) + 0x1004))
                    .unwrap();
                g.avail[1] = g.avail[1].wrapping_add(n);
                g.mem
                    .write_obj(g.avail[1].to_le(), GuestAddress(base(1) + 0x1002))
                    .unwrap();
                for _ in 0..4 {
                    if !dev.queue_notify(1) {
                        break;
                    }
                }
            }
            2 => {
                let b = input.byte().unwrap_or(0);
                let n = 1 + (b & 7);
                let size = u32::from(input.byte().unwrap_or(0)) * 64;
                for _ in 0..n {
                    let i = g.avail[0] % SIZE;
                    if g.rx_outstanding[usize::from(i)] {
                        break; // still the device's: wait for it to come back
                    }
                    g.desc(0, i, DATA + 0x8_0000 + u64::from(i) * 0x4000, size, 2, 0);
                    g.rx_len[usize::from(i)] = size;
                    g.rx_outstanding[usize::from(i)] = true;
                    g.publish(0, i);
                }
                while dev.queue_notify(0) {}
            }
            3 => {
                dev.reset();
                g.activate(&mut dev);
                peers.clear();
            }
            4 => pump(&mut dev),
            5 => {
                for l in &listeners {
                    while let Ok((s, _)) = l.accept_timeout(std::time::Duration::ZERO) {
                        s.set_nonblocking(true).unwrap();
                        if peers.len() < 16 {
                            peers.push(s);
                        }
                    }
                }
                let n = usize::from(input.byte().unwrap_or(0));
                let bytes = input.take(n).to_vec();
                if !peers.is_empty() {
                    let i = n % peers.len();
                    let _ = peers[i].write(&bytes);
                }
                pump(&mut dev);
            }
            6 => {
                let b = input.byte().unwrap_or(0);
                if !peers.is_empty() {
                    let i = usize::from(b) % peers.len();
                    if b & 0x80 != 0 {
                        let _ = peers[i].shutdown(std::net::Shutdown::Write);
                    } else {
                        peers.swap_remove(i);
                    }
                }
                pump(&mut dev);
            }
            _ => {
                // A driver scribbling on the device-owned used ring (flags, entry 0). The
                // index is put back: the device never reads the ring, and the harness can only
                // check entries the device wrote after its last check, which a junk index
                // would make it read as if they were new (false alarms, not device bugs).
                let idx: u16 = g.mem.read_obj(GuestAddress(base(0) + 0x2002)).unwrap();
                let junk = input.take(8);
                g.mem
                    .write_slice(junk, GuestAddress(base(0) + 0x2000))
                    .unwrap();
                g.mem
                    .write_obj(idx, GuestAddress(base(0) + 0x2002))
                    .unwrap();
            }
        }
        g.check_rx();
        assert!(dev.stats().connections <= MAX_CONNECTIONS as u64);
    }
    drop(listeners);
});

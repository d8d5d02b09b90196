//! Guest MMIO accesses, EOIs and device line changes against the userspace IOAPIC
//! (`devices::legacy::Ioapic`), backed by a stand-in `hypervisor::Vm` that records the routing
//! tables it is handed and the GSIs it is asked to raise.
//!
//! The input is a sequence of 8-byte records:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | bits 0-1: 0 = MMIO read, 1 = MMIO write, 2 = EOI of vector `b3`, 3 = `set_line(b1 % 32, b3 & 1)`; bits 2-4: access size, an index into `SIZES` (1, 2, 4, 8 and the invalid 0, 3, 5); bit 5: offset is `REGS[b1 % 4] + b2 % 4` (else `b1 b2` little-endian, anywhere in and past the 0x1000 window) |
//! | 1-2 | offset / pin |
//! | 3-7 | value (little-endian, the first `size` bytes are used) |
//!
//! Checks: nothing panics; every routing table handed over has only pins 0-23, in order, each
//! once, with an MSI to the 0xFEEx_xxxx window whose data matches the pin's (unmasked)
//! redirection entry; only pins that exist are raised, and only while unmasked; a level pin is
//! raised again only by an EOI of its vector (op 2 or the EOI register; remote IRR); the
//! IOAPIC's state survives a `state()` / `from_state()` round trip.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::legacy::ioapic::{Ioapic, RedirectionEntry, IOAPIC_NUM_PINS};
use smolvm::devices::BusDevice;
use smolvm::hypervisor::{
    GsiRoute, GsiTarget, HypervisorError, IrqchipMode, IrqchipOrder, MemoryRegion, Vcpu, Vm,
};

/// Access sizes selectable by bits 2-4 (the odd ones must be ignored without a panic).
const SIZES: [usize; 8] = [1, 2, 4, 8, 0, 3, 5, 4];
/// Register offsets worth aiming at: IOREGSEL, IOWIN, EOI, an unknown one.
const REGS: [u64; 4] = [0x00, 0x10, 0x40, 0x20];

#[derive(Default)]
struct Recorder {
    tables: Mutex<Vec<Vec<GsiRoute>>>,
    raised: Mutex<Vec<u32>>,
}

impl Vm for Recorder {
    unsafe fn map_memory(&self, _: MemoryRegion) -> smolvm::hypervisor::Result<()> {
        Err(HypervisorError::Unsupported("fuzzing"))
    }
    fn unmap_memory(&self, _: MemoryRegion) -> smolvm::hypervisor::Result<()> {
        Err(HypervisorError::Unsupported("fuzzing"))
    }
    fn irqchip_order(&self) -> IrqchipOrder {
        IrqchipOrder::BeforeVcpus
    }
    fn create_irqchip(&self, _: IrqchipMode) -> smolvm::hypervisor::Result<()> {
        Ok(())
    }
    fn set_irq_line(&self, gsi: u32, level: bool) -> smolvm::hypervisor::Result<()> {
        if level {
            self.raised.lock().unwrap().push(gsi);
        }
        Ok(())
    }
    fn set_gsi_routing(&self, routes: &[GsiRoute]) -> smolvm::hypervisor::Result<()> {
        self.tables.lock().unwrap().push(routes.to_vec());
        Ok(())
    }
    fn create_vcpu(&self, _: u32) -> smolvm::hypervisor::Result<Box<dyn Vcpu>> {
        Err(HypervisorError::Unsupported("fuzzing"))
    }
}

/// Every table must describe the IOAPIC's current entries exactly.
fn check_table(io: &Ioapic, table: &[GsiRoute]) {
    let mut last = None;
    for r in table {
        assert!(
            (r.gsi as usize) < IOAPIC_NUM_PINS,
            "route for GSI {}",
            r.gsi
        );
        assert!(
            last < Some(r.gsi),
            "routes out of order or repeated: {table:?}"
        );
        last = Some(r.gsi);
        let GsiTarget::Msi(msi) = r.target else {
            panic!("non-MSI route {r:?}")
        };
        assert_eq!(msi.address & !0xf_fffc, 0xfee0_0000, "{msi:?}");
        assert!(msi.devid.is_none());
        let e = io.redirection_entry(r.gsi as usize).unwrap();
        assert!(!e.masked, "route for masked pin {}", r.gsi);
        assert_eq!(msi.data & 0xff, u32::from(e.vector));
        assert_eq!(msi.data & (1 << 15) != 0, e.level_triggered);
    }
    assert_eq!(table, io.routes().as_slice());
}

fuzz_target!(|data: &[u8]| {
    let vm = Arc::new(Recorder::default());
    let mut io = Ioapic::new(vm.clone());
    for rec in data.chunks_exact(8) {
        let op = rec[0];
        let before = io.state();
        // The vector this step EOIs, if it is an EOI (op 2, or a write to the EOI register).
        let mut eoi = None;
        match op & 3 {
            0 | 1 => {
                let size = SIZES[usize::from((op >> 2) & 7)];
                let offset = if op & 0x20 != 0 {
                    REGS[usize::from(rec[1]) % 4] + u64::from(rec[2] % 4)
                } else {
                    u64::from(u16::from_le_bytes([rec[1], rec[2]])) & 0x1fff
                };
                let mut buf = [0u8; 8];
                buf[..5].copy_from_slice(&rec[3..8]);
                if op & 3 == 0 {
                    io.read(0xfec0_0000, offset, &mut buf[..size]);
                } else {
                    if offset == 0x40 && matches!(size, 1 | 2 | 4 | 8) {
                        eoi = Some(buf[0]);
                    }
                    io.write(0xfec0_0000, offset, &buf[..size]);
                }
            }
            2 => {
                eoi = Some(rec[3]);
                io.end_of_interrupt(rec[3]).unwrap();
            }
            _ => io
                .set_line(u32::from(rec[1] % 32), rec[3] & 1 != 0)
                .unwrap(),
        }
        // What this step raised.
        let raised = std::mem::take(&mut *vm.raised.lock().unwrap());
        for &gsi in &raised {
            assert!((gsi as usize) < IOAPIC_NUM_PINS, "raised GSI {gsi}");
            let e = io.redirection_entry(gsi as usize).unwrap();
            assert!(!e.masked, "raised masked pin {gsi}");
            let was = RedirectionEntry::from_raw(before.redirection[gsi as usize]);
            if e.level_triggered && was.level_triggered && was.remote_irr && !was.masked {
                // Remote IRR was set: only an EOI of its vector may re-deliver.
                assert_eq!(
                    eoi,
                    Some(was.vector),
                    "level pin {gsi} raised again without an EOI of its vector"
                );
            }
        }
        if let Some(table) = vm.tables.lock().unwrap().last() {
            check_table(&io, table);
        }
    }
    let s = io.state();
    assert_eq!(Ioapic::from_state(vm, s).state(), s);
});

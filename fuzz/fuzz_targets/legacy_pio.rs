//! Guest port I/O against the legacy devices, wired on a `Bus` exactly as the VMM wires them
//! (`src/vmm/builder.rs`): 16550 UART at COM1 (8 ports, IRQ 4, console discarded), i8042 at
//! 0x60 and 0x64, PM1a control at 0x604 (2 ports). Platform events go into counters.
//!
//! The input is a sequence of 8-byte records, each one access:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | bit 0: write (else read); bits 1-2: size 1/2/4/4; bit 3: port is `known[b1] + b2 % 8` (else the raw little-endian `b1 b2`); bit 4: instead, queue `b3..` as console input (1 to 4 bytes, length from bits 5-6) |
//! | 1-2 | port |
//! | 3-6 | value (little-endian, the first `size` bytes are used) |
//! | 7 | string I/O repeat count − 1, bits 0-1 (like `rep outsb`: the vCPU loop splits `count × size` bytes into `size` chunks) |
//!
//! Checks: nothing panics; reads of unclaimed ports return all-ones; `Bus::read`/`write`
//! report a port claimed exactly when one of the devices covers it; the serial interrupt line
//! is only ever pulsed (raised, then lowered).

#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::legacy::{self, ConsoleSink, PmControl, Serial, I8042};
use smolvm::devices::{Bus, InterruptLine, PlatformEvent, PlatformEventSink};
use smolvm::hypervisor::{HypervisorError, IrqchipMode, IrqchipOrder, MemoryRegion, Vcpu, Vm};

/// A VM that only records interrupt-line changes. It has no irqfd, so the UART's
/// [`InterruptLine`] takes the `set_irq_line` path, which this checks.
#[derive(Default)]
struct IrqRecorder {
    /// Number of `set_irq_line` calls; odd while a line is high.
    changes: AtomicU64,
}

impl Vm for IrqRecorder {
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
        assert_eq!(gsi, legacy::COM1_IRQ, "only the UART has a line");
        let before = self.changes.fetch_add(1, Ordering::Relaxed);
        assert_eq!(level, before & 1 == 0, "the line is pulsed: high, then low");
        Ok(())
    }
    fn create_vcpu(&self, _: u32) -> smolvm::hypervisor::Result<Box<dyn Vcpu>> {
        Err(HypervisorError::Unsupported("fuzzing"))
    }
}

/// Ports the devices claim, as (base, length).
const CLAIMED: [(u16, u16); 4] = [
    (legacy::COM1_PORT, 8),
    (legacy::I8042_DATA_PORT, 1),
    (legacy::I8042_COMMAND_PORT, 1),
    (legacy::PM1A_CONTROL_PORT, 2),
];

/// Ports worth aiming at (record bit 3), including neighbours of the claimed ranges.
const KNOWN: [u16; 8] = [
    legacy::COM1_PORT,
    legacy::COM1_PORT - 4,
    legacy::I8042_DATA_PORT,
    legacy::I8042_COMMAND_PORT - 2,
    legacy::PM1A_CONTROL_PORT,
    legacy::PM1A_CONTROL_PORT - 4,
    0x2f8, // COM2: absent
    0x510, // the tiny guests' test port: absent here
];

fn claimed(port: u16) -> bool {
    CLAIMED
        .iter()
        .any(|&(base, len)| port >= base && port - base < len)
}

struct Platform {
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
    resets: Arc<AtomicU64>,
    power_offs: Arc<AtomicU64>,
}

/// The port bus as `src/vmm/builder.rs` builds it.
fn platform() -> Platform {
    let resets = Arc::new(AtomicU64::new(0));
    let power_offs = Arc::new(AtomicU64::new(0));
    let events: PlatformEventSink = {
        let (resets, power_offs) = (resets.clone(), power_offs.clone());
        Arc::new(move |event| {
            match event {
                PlatformEvent::Reset => &resets,
                PlatformEvent::PowerOff => &power_offs,
            }
            .fetch_add(1, Ordering::Relaxed);
        })
    };
    let vm: Arc<dyn Vm> = Arc::new(IrqRecorder::default());
    let irq = InterruptLine::new(&vm, legacy::COM1_IRQ).expect("interrupt line");
    let serial = Arc::new(Mutex::new(Serial::new(irq, ConsoleSink::Discard)));
    let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
    let mut pio = Bus::new("pio");
    pio.insert(u64::from(legacy::COM1_PORT), 8, serial.clone())
        .unwrap();
    pio.insert(u64::from(legacy::I8042_DATA_PORT), 1, i8042.clone())
        .unwrap();
    pio.insert(u64::from(legacy::I8042_COMMAND_PORT), 1, i8042)
        .unwrap();
    pio.insert(
        u64::from(legacy::PM1A_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(PmControl::new(events))),
    )
    .unwrap();
    Platform {
        pio,
        serial,
        resets,
        power_offs,
    }
}

fuzz_target!(|data: &[u8]| {
    // A fresh platform per input, so every input is reproducible on its own.
    let p = platform();
    for rec in data.chunks_exact(8) {
        let op = rec[0];
        if op & 0x10 != 0 {
            let n = 1 + usize::from((op >> 5) & 3);
            let r = p.serial.lock().unwrap().enqueue_input(&rec[3..3 + n]);
            assert!(matches!(r, Ok(k) if k <= n), "{r:?}");
            continue;
        }
        let write = op & 1 != 0;
        let size = [1usize, 2, 4, 4][usize::from((op >> 1) & 3)];
        let port = if op & 0x08 != 0 {
            KNOWN[usize::from(rec[1]) % KNOWN.len()].wrapping_add(u16::from(rec[2] % 8))
        } else {
            u16::from_le_bytes([rec[1], rec[2]])
        };
        let count = 1 + usize::from(rec[7] & 3);
        let value = &rec[3..3 + size];
        for _ in 0..count {
            if write {
                let hit = p.pio.write(u64::from(port), value);
                assert_eq!(hit, claimed(port), "write to {port:#x}");
            } else {
                let mut buf = [0x5au8; 4];
                let buf = &mut buf[..size];
                let hit = p.pio.read(u64::from(port), buf);
                assert_eq!(hit, claimed(port), "read of {port:#x}");
                if !hit {
                    assert!(
                        buf.iter().all(|&b| b == 0xff),
                        "unclaimed read of {port:#x} gave {buf:02x?}"
                    );
                }
            }
        }
    }
    // Each reset/power-off needs at least one write; keep the counters observable.
    let events = p.resets.load(Ordering::Relaxed) + p.power_offs.load(Ordering::Relaxed);
    assert!(events <= 4 * data.len() as u64);
});

//! An address bus: non-overlapping ranges mapped to devices.
//!
//! One type serves both x86 port I/O and MMIO. The bus is built before the VM starts and is
//! immutable afterwards, so lookups on the vCPU exit path take no lock except the device's
//! own.

use std::fmt;
use std::sync::{Arc, Mutex};

/// A device that answers guest loads and stores in its address range.
///
/// `base` is the start of the range the device was inserted at (a device may be inserted at
/// several ranges), `offset` the distance from it. Guest values are little-endian; `data`
/// is 1, 2, 4 or 8 bytes long for MMIO and a multiple of the access size for port I/O.
///
/// # Example
/// ```
/// use smolvm::devices::BusDevice;
///
/// /// Reads back the last byte written.
/// struct Latch(u8);
/// impl BusDevice for Latch {
///     fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
///         data.fill(self.0);
///     }
///     fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
///         if let Some(b) = data.first() {
///             self.0 = *b;
///         }
///     }
/// }
/// ```
pub trait BusDevice: Send {
    /// Guest load: fill `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest store of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Why a device could not be added to a bus.
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::{legacy::PmControl, Bus, BusError};
/// let pm = Arc::new(Mutex::new(PmControl::new(Arc::new(|_| {}))));
/// let mut bus = Bus::new("pio");
/// bus.insert(0x604, 2, pm.clone()).unwrap();
/// match bus.insert(0x605, 1, pm) {
///     Err(BusError::Overlap { old_base, .. }) => assert_eq!(old_base, 0x604),
///     other => panic!("expected an overlap, got {other:?}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already present.
    #[error("range {new_base:#x}+{new_len:#x} overlaps the device at {old_base:#x}+{old_len:#x}")]
    Overlap {
        /// Start of the rejected range.
        new_base: u64,
        /// Length of the rejected range.
        new_len: u64,
        /// Start of the range already present.
        old_base: u64,
        /// Length of the range already present.
        old_len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges → devices.
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::{Bus, BusDevice};
///
/// struct Zero;
/// impl BusDevice for Zero {
///     fn read(&mut self, _: u64, _: u64, data: &mut [u8]) { data.fill(0) }
///     fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
/// }
/// let mut bus = Bus::new("pio");
/// bus.insert(0x80, 1, Arc::new(Mutex::new(Zero))).unwrap();
/// assert!(bus.insert(0x80, 4, Arc::new(Mutex::new(Zero))).is_err());
/// let mut b = [0xaa];
/// assert!(bus.read(0x80, &mut b));
/// assert_eq!(b, [0]);
/// assert!(!bus.read(0x81, &mut b));
/// assert_eq!(b, [0xff], "unclaimed reads float high");
/// ```
pub struct Bus {
    name: &'static str,
    /// Sorted by `base`, non-overlapping.
    entries: Vec<Entry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<_> = self
            .entries
            .iter()
            .map(|e| format!("{:#x}+{:#x}", e.base, e.len))
            .collect();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus; `name` appears in logs (`"pio"`, `"mmio"`).
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            entries: Vec::new(),
        }
    }

    /// Adds `device` at `base .. base + len`.
    ///
    /// # Errors
    /// [`BusError::Overlap`] if any byte of the range is taken, [`BusError::InvalidRange`] for
    /// an empty or wrapping range.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        let neighbours = [pos.checked_sub(1), Some(pos)];
        for e in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.entries.get(i))
        {
            if base < e.base + e.len && e.base < base + len {
                return Err(BusError::Overlap {
                    new_base: base,
                    new_len: len,
                    old_base: e.base,
                    old_len: e.len,
                });
            }
        }
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(pos.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some(e)
    }

    /// Dispatches a guest load. Returns whether a device claimed `addr`; unclaimed loads read
    /// all-ones, as on a real bus with nothing driving it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.device).read(e.base, addr - e.base, data);
                true
            }
            None => {
                log::debug!(
                    "{}: unclaimed read of {} bytes at {addr:#x}",
                    self.name,
                    data.len()
                );
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest store. Returns whether a device claimed `addr`; unclaimed stores are
    /// dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.device).write(e.base, addr - e.base, data);
                true
            }
            None => {
                log::debug!("{}: unclaimed write {data:02x?} at {addr:#x}", self.name);
                false
            }
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device that panicked mid-access keeps
/// whatever state it had, which is what hardware would do.
fn lock(d: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn overlaps_are_rejected_on_both_sides() {
        let mut bus = Bus::new("t");
        bus.insert(0x100, 0x10, dev()).unwrap();
        for (b, l) in [
            (0xf8, 0x9),
            (0x10f, 1),
            (0x100, 0x10),
            (0x104, 2),
            (0x0, 0x1000),
        ] {
            assert!(
                matches!(bus.insert(b, l, dev()), Err(BusError::Overlap { .. })),
                "{b:#x}+{l:#x}"
            );
        }
        bus.insert(0xf0, 0x10, dev()).unwrap();
        bus.insert(0x110, 1, dev()).unwrap();
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = Bus::new("t");
        assert!(matches!(
            bus.insert(5, 0, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn accesses_reach_the_right_device_with_offsets() {
        let mut bus = Bus::new("t");
        let a = dev();
        let b = dev();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 1, b.clone()).unwrap();
        bus.insert(0x64, 1, b.clone()).unwrap();
        assert!(bus.write(0x3fb, &[1]));
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x61, &[1]));
        assert_eq!(a.lock().unwrap().writes, vec![(0x3f8, 3, vec![1])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0x64, 0, vec![0xfe])]);
        let mut d = [0u8; 2];
        assert!(bus.read(0x3f9, &mut d));
        assert_eq!(d, [0xf9, 0xf9]);
        assert!(!bus.read(0x3f7, &mut d));
        assert_eq!(d, [0xff, 0xff]);
    }
}

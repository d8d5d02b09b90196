//! ACPI PM1a control register: the guest's power-off switch.
//!
//! x86 microVMs have no firmware power controller. Writing SLP_EN (bit 13) here, with any
//! sleep type, powers the VM off (a microVM has no sleep states to enter). The register sits
//! at QEMU's ICH9 address (0x604), so `outw(0x604, 0x2000)`, the well-known QEMU power-off,
//! works; ACPI tables can later point Linux's FADT at it.

use crate::devices::{BusDevice, PlatformEvent, PlatformEventSink};

/// SLP_EN: enter the sleep state in SLP_TYP.
const SLP_EN: u16 = 1 << 13;

/// The PM1a control register (2 bytes).
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::{legacy::PmControl, BusDevice, PlatformEvent};
///
/// let seen = Arc::new(Mutex::new(None));
/// let s = seen.clone();
/// let mut pm = PmControl::new(Arc::new(move |e| *s.lock().unwrap() = Some(e)));
/// pm.write(0x604, 0, &0x2000u16.to_le_bytes());
/// assert_eq!(*seen.lock().unwrap(), Some(PlatformEvent::PowerOff));
/// ```
pub struct PmControl {
    events: PlatformEventSink,
    value: u16,
}

impl PmControl {
    /// A register that reports power-off to `events`.
    pub fn new(events: PlatformEventSink) -> Self {
        PmControl { events, value: 0 }
    }
}

impl BusDevice for PmControl {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| bytes.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, d) in data.iter().enumerate() {
            if let Some(b) = offset
                .checked_add(i as u64)
                .and_then(|o| bytes.get_mut(o as usize))
            {
                *b = *d;
            }
        }
        let value = u16::from_le_bytes(bytes);
        if value & SLP_EN != 0 {
            (self.events)(PlatformEvent::PowerOff);
        }
        // SLP_EN is write-only and reads back as 0.
        self.value = value & !SLP_EN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn only_slp_en_powers_off() {
        let n = Arc::new(Mutex::new(0));
        let c = n.clone();
        let mut pm = PmControl::new(Arc::new(move |_| *c.lock().unwrap() += 1));
        pm.write(0, 0, &0x1c00u16.to_le_bytes());
        assert_eq!(*n.lock().unwrap(), 0);
        let mut b = [0; 2];
        pm.read(0, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1c00);
        // High byte alone, as an 8-bit write.
        pm.write(0, 1, &[0x20]);
        assert_eq!(*n.lock().unwrap(), 1);
        pm.read(0, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SLP_EN, 0);
    }
}

//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU-reset line.
//!
//! Linux reboots through it with `reboot=k` (command 0xFE pulses the reset output). The few
//! other commands a driver issues while probing get plausible answers so a guest that probes
//! anyway does not spin; keyboard and mouse data never arrive.

use crate::devices::{BusDevice, PlatformEvent, PlatformEventSink};

use super::{I8042_COMMAND_PORT, I8042_DATA_PORT};

/// Status bit 0: output buffer full (data waiting at port 0x60).
const STATUS_OBF: u8 = 1 << 0;
/// Status bit 2: system flag, set once the self-test passed.
const STATUS_SYS: u8 = 1 << 2;
/// Status bit 3: the last write was a command (port 0x64).
const STATUS_CMD: u8 = 1 << 3;

/// i8042 on ports 0x60 (data) and 0x64 (command/status).
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::{legacy::I8042, BusDevice, PlatformEvent};
///
/// let events = Arc::new(Mutex::new(Vec::new()));
/// let log = events.clone();
/// let mut kbd = I8042::new(Arc::new(move |e| log.lock().unwrap().push(e)));
/// kbd.write(0x64, 0, &[0xfe]);
/// assert_eq!(*events.lock().unwrap(), [PlatformEvent::Reset]);
/// ```
pub struct I8042 {
    events: PlatformEventSink,
    status: u8,
    /// Controller configuration byte ("command byte"): interrupts off, keyboard disabled.
    config: u8,
    output: Option<u8>,
    /// Command waiting for its data byte at port 0x60.
    pending: Option<u8>,
}

impl I8042 {
    /// A controller that reports resets to `events`.
    pub fn new(events: PlatformEventSink) -> Self {
        I8042 {
            events,
            status: STATUS_SYS,
            config: 0x30,
            output: None,
            pending: None,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.output = Some(self.config),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(cmd),
            0xa7 => self.config |= 0x20,
            0xa8 => self.config &= !0x20,
            0xa9 | 0xab => self.output = Some(0x00),
            0xaa => self.output = Some(0x55),
            0xad => self.config |= 0x10,
            0xae => self.config &= !0x10,
            // Pulse output-port lines; bit 0 low pulses CPU reset.
            0xf0..=0xff if cmd & 1 == 0 => (self.events)(PlatformEvent::Reset),
            0xf0..=0xff => {}
            other => log::debug!("i8042: ignoring command {other:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(0x60) => self.config = value,
            // Write output port: bit 0 is the CPU reset line (active low).
            Some(0xd1) if value & 1 == 0 => (self.events)(PlatformEvent::Reset),
            Some(0xd1) => {}
            // Echo to the keyboard/aux output buffer.
            Some(0xd2) | Some(0xd3) => self.output = Some(value),
            // Bytes for the (absent) mouse are swallowed.
            Some(_) => {}
            // Bytes for the (absent) keyboard get an ACK so a probing driver moves on.
            None => self.output = Some(0xfa),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = match base + offset {
            p if p == u64::from(I8042_DATA_PORT) => self.output.take().unwrap_or(0),
            p if p == u64::from(I8042_COMMAND_PORT) => {
                self.status | if self.output.is_some() { STATUS_OBF } else { 0 }
            }
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base + offset {
            p if p == u64::from(I8042_DATA_PORT) => {
                self.status &= !STATUS_CMD;
                self.data(value)
            }
            p if p == u64::from(I8042_COMMAND_PORT) => {
                self.status |= STATUS_CMD;
                self.command(value)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn kbd() -> (I8042, Arc<Mutex<Vec<PlatformEvent>>>) {
        let ev = Arc::new(Mutex::new(Vec::new()));
        let e = ev.clone();
        (I8042::new(Arc::new(move |x| e.lock().unwrap().push(x))), ev)
    }

    fn read(k: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        k.read(port, 0, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_raises_reset() {
        let (mut k, ev) = kbd();
        k.write(0x64, 0, &[0xfe]);
        assert_eq!(*ev.lock().unwrap(), [PlatformEvent::Reset]);
    }

    #[test]
    fn output_port_write_with_reset_bit_low_resets() {
        let (mut k, ev) = kbd();
        k.write(0x64, 0, &[0xd1]);
        k.write(0x60, 0, &[0xdf]);
        assert!(ev.lock().unwrap().is_empty());
        k.write(0x64, 0, &[0xd1]);
        k.write(0x60, 0, &[0xde]);
        assert_eq!(*ev.lock().unwrap(), [PlatformEvent::Reset]);
    }

    #[test]
    fn self_test_and_config_byte() {
        let (mut k, ev) = kbd();
        assert_eq!(read(&mut k, 0x64) & STATUS_OBF, 0);
        k.write(0x64, 0, &[0xaa]);
        assert_eq!(read(&mut k, 0x64) & STATUS_OBF, STATUS_OBF);
        assert_eq!(read(&mut k, 0x60), 0x55);
        assert_eq!(read(&mut k, 0x64) & STATUS_OBF, 0);
        k.write(0x64, 0, &[0x60]);
        k.write(0x60, 0, &[0x47]);
        k.write(0x64, 0, &[0x20]);
        assert_eq!(read(&mut k, 0x60), 0x47);
        // 0xff pulses no line (bit 0 set): not a reset.
        k.write(0x64, 0, &[0xff]);
        assert!(ev.lock().unwrap().is_empty());
    }

    #[test]
    fn keyboard_bytes_are_acked() {
        let (mut k, _) = kbd();
        k.write(0x60, 0, &[0xf4]);
        assert_eq!(read(&mut k, 0x60), 0xfa);
    }
}

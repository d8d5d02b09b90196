//! 16550A UART (vm-superio's register model) wired to a caller-provided console sink and an
//! interrupt line.

use std::io::{self, Write};

use crate::devices::{BusDevice, InterruptLine};

/// A callback that receives console output.
pub type ConsoleCallback = Box<dyn FnMut(&[u8]) + Send>;

/// Where guest console output goes: any writer, or a callback.
///
/// # Example
/// ```
/// use std::io::Write;
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::legacy::ConsoleSink;
/// let out = Arc::new(Mutex::new(Vec::new()));
/// let o = out.clone();
/// let mut sink = ConsoleSink::Callback(Box::new(move |b| o.lock().unwrap().extend_from_slice(b)));
/// sink.write_all(b"login: ")?;
/// assert_eq!(&out.lock().unwrap()[..], b"login: ");
/// # Ok::<(), std::io::Error>(())
/// ```
pub enum ConsoleSink {
    /// Output is dropped.
    Discard,
    /// Output is written to this writer, byte by byte as the guest sends it.
    Writer(Box<dyn Write + Send>),
    /// Output is handed to this callback, one byte slice per guest write.
    Callback(ConsoleCallback),
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsoleSink::Discard => "ConsoleSink::Discard",
            ConsoleSink::Writer(_) => "ConsoleSink::Writer",
            ConsoleSink::Callback(_) => "ConsoleSink::Callback",
        })
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleSink::Discard => Ok(buf.len()),
            ConsoleSink::Writer(w) => w.write(buf),
            ConsoleSink::Callback(cb) => {
                cb(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleSink::Writer(w) => w.flush(),
            _ => Ok(()),
        }
    }
}

/// Adapts [`InterruptLine`] to vm-superio's trigger interface.
///
/// # Example
/// ```no_run
/// use smolvm::devices::{legacy::serial::IrqTrigger, InterruptLine};
/// use vm_superio::Trigger;
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(Default::default())?;
/// let irq = IrqTrigger(InterruptLine::new(&vm, 4)?);
/// irq.trigger()?; // what vm-superio's UART calls to interrupt the guest
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct IrqTrigger(pub InterruptLine);

impl vm_superio::Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A 16550A UART on the port bus.
///
/// # Example
/// ```no_run
/// # use std::sync::Arc;
/// # fn demo(vm: Arc<dyn smolvm::hypervisor::Vm>) -> Result<(), Box<dyn std::error::Error>> {
/// use smolvm::devices::{legacy::{ConsoleSink, Serial}, InterruptLine};
/// let irq = InterruptLine::new(&vm, 4)?;
/// let mut com1 = Serial::new(irq, ConsoleSink::Writer(Box::new(std::io::stdout())));
/// com1.enqueue_input(b"root\n")?;
/// # Ok(()) }
/// ```
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
    /// Whether a sink error was already logged (avoid one log line per guest byte).
    sink_error_logged: bool,
}

impl Serial {
    /// A UART raising `irq` and writing output to `sink`.
    pub fn new(irq: InterruptLine, sink: ConsoleSink) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), sink),
            sink_error_logged: false,
        }
    }

    /// Queues `input` for the guest to read, raising the receive interrupt. Returns how many
    /// bytes fit in the 64-byte receive FIFO (0 when it is full: retry after the guest reads).
    ///
    /// # Errors
    /// Raising the interrupt failed.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(vm_superio::serial::Error::Trigger(e)) => Err(e),
            Err(vm_superio::serial::Error::IOError(e)) => Err(e),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if off >= 8 {
            return;
        }
        if let Err(e) = self.uart.write(off, *value) {
            if !self.sink_error_logged {
                log::warn!("serial console: {e:?}");
                self.sink_error_logged = true;
            }
        }
    }
}

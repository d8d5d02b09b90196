//! A userspace IOAPIC (82093AA-style, version 0x20 with the EOI register), for x86 VMs whose
//! interrupt controller is split ([`IrqchipMode::Split`]).
//!
//! # Why it exists
//!
//! With KVM's fully in-kernel irqchip, destroying a VM costs 15-25 ms of wall time: each
//! in-kernel PIC/IOAPIC/PIT device on the kernel's I/O bus waits for an SRCU grace period when
//! it is unregistered. With a split irqchip only the LAPICs stay in the kernel and VM
//! teardown takes ~0.15 ms — but then the IOAPIC must be emulated in userspace. This is that
//! IOAPIC. It turns each redirection table entry (RTE) into an MSI route and hands the routing
//! table to the hypervisor ([`Vm::set_gsi_routing`]), so interrupts still go from device to
//! LAPIC without a userspace round trip:
//!
//! - **Edge-triggered pins**: a device raises the pin through an
//!   [`InterruptLine`](crate::devices::InterruptLine) (an irqfd on the pin's GSI); the kernel
//!   sends the route's MSI. The IOAPIC is not involved per interrupt.
//! - **Level-triggered pins**: the device reports its line state with
//!   [`Ioapic::set_line`]. The IOAPIC delivers the interrupt, sets the RTE's remote IRR bit and
//!   delivers nothing more on that pin until the guest's EOI comes back as
//!   [`VmExit::IoapicEoi`](crate::hypervisor::VmExit::IoapicEoi)
//!   ([`Ioapic::end_of_interrupt`]) or through the EOI register; if the line is still asserted
//!   then, it delivers again. Do not drive level pins through an `InterruptLine`: an irqfd
//!   bypasses remote IRR.
//!
//! # Registers
//!
//! MMIO window of 0x1000 bytes at [`layout::IOAPIC_START`]: IOREGSEL at offset 0x00, IOWIN at
//! 0x10, EOI at 0x40. Indirect registers: ID (0x00), VER (0x01: version 0x20, 23 = highest
//! redirection entry), ARB (0x02), and the 24 RTEs at 0x10-0x3f (low dword at `0x10 + 2n`,
//! high dword at `0x11 + 2n`).
//!
//! Everything the guest does here is untrusted and never panics:
//! - 32-bit accesses are the architected ones. Narrower writes at a register's offset are
//!   zero-extended, an 8-byte write uses its low dword (as KVM's in-kernel IOAPIC does); writes
//!   anywhere else are ignored. Reads return the register's bytes from the accessed offset
//!   (bytes past the register read 0).
//! - **Unknown MMIO offsets read 0**, **unknown indirect registers read all-ones** — exactly what
//!   KVM's in-kernel IOAPIC returns, so a guest sees the same chip in both
//!   [`IrqchipMode`]s (all-ones is also what a read of nothing floats to on a real bus).
//! - Read-only bits (RTE delivery status and remote IRR, VER, the reserved low bits of ID)
//!   ignore writes.
//! - An RTE with a vector below 0x10 is accepted and routed unchanged, as the real IOAPIC does
//!   (it does not check vectors): what happens next is the LAPIC's business (real hardware
//!   flags an illegal vector in ESR and drops it; KVM's LAPIC delivers it).
//! - Pins whose delivery mode is reserved (3, 6) or ExtINT (7: there is no PIC behind a split
//!   irqchip) get no route, like masked pins: real hardware would deliver nothing useful.
//!
//! Polarity (RTE bit 13) is stored and read back but not applied: [`Ioapic::set_line`] takes
//! the *logical* state (asserted or not), as device models know it.

use std::sync::Arc;

use crate::arch::x86_64::layout;
use crate::devices::BusDevice;
use crate::hypervisor::{GsiRoute, HypervisorError, Msi, Vm};

#[cfg(doc)]
use crate::hypervisor::IrqchipMode;

/// Number of pins (and RTEs).
pub const IOAPIC_NUM_PINS: usize = layout::IOAPIC_PINS as usize;
/// Size of the MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC version reported in VER (0x20: has the EOI register).
pub const IOAPIC_VERSION: u32 = 0x20;

/// MMIO offset of IOREGSEL.
const REG_SELECT: u64 = 0x00;
/// MMIO offset of IOWIN.
const REG_WINDOW: u64 = 0x10;
/// MMIO offset of the EOI register.
const REG_EOI: u64 = 0x40;

const IND_ID: u32 = 0x00;
const IND_VER: u32 = 0x01;
const IND_ARB: u32 = 0x02;
const IND_REDIR_START: u32 = 0x10;

/// RTE bits.
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Bits the guest cannot write.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

/// The MSI address window every IOAPIC message goes to.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// The IOAPIC's complete state: plain data, so it can be saved and restored
/// ([`Ioapic::state`], [`Ioapic::from_state`]).
///
/// # Example
/// ```
/// use smolvm::devices::legacy::ioapic::IoapicState;
/// let s = IoapicState::default();
/// assert!(s.redirection.iter().all(|rte| rte & (1 << 16) != 0), "pins start masked");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicState {
    /// IOAPIC id (4 bits, ID register bits 24-27).
    pub id: u8,
    /// The last value written to IOREGSEL (8 bits).
    pub select: u8,
    /// The redirection table, one 64-bit entry per pin, including remote IRR (bit 14).
    pub redirection: [u64; IOAPIC_NUM_PINS],
    /// Logical line state of each pin (bit n = pin n asserted), from [`Ioapic::set_line`].
    pub lines: u32,
}

impl Default for IoapicState {
    /// The reset state: every pin masked, edge-triggered, vector 0; id 0.
    fn default() -> Self {
        IoapicState {
            id: 0,
            select: 0,
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS],
            lines: 0,
        }
    }
}

/// What one redirection table entry means, decoded.
///
/// # Example
/// ```
/// use smolvm::devices::legacy::ioapic::RedirectionEntry;
/// // Vector 0x39, level-triggered, active low, to APIC id 0: how Linux programs a PCI INTx pin.
/// let e = RedirectionEntry::from_raw(0xa039);
/// assert!(e.level_triggered && e.active_low && !e.masked);
/// assert_eq!(e.msi().unwrap().data, 0xc039, "level and assert bits set in the MSI");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectionEntry {
    /// Interrupt vector (bits 0-7).
    pub vector: u8,
    /// Delivery mode (bits 8-10): 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT.
    pub delivery_mode: u8,
    /// Logical destination mode (bit 11).
    pub logical_destination: bool,
    /// Active low (bit 13).
    pub active_low: bool,
    /// Remote IRR (bit 14): a level interrupt was delivered and not yet EOI'd.
    pub remote_irr: bool,
    /// Level-triggered (bit 15).
    pub level_triggered: bool,
    /// Masked (bit 16).
    pub masked: bool,
    /// Destination APIC id or logical set (bits 56-63).
    pub destination: u8,
}

impl RedirectionEntry {
    /// Decodes a raw 64-bit RTE.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::legacy::ioapic::RedirectionEntry;
    /// let e = RedirectionEntry::from_raw(0x0300_0000_0000_8041);
    /// assert_eq!((e.vector, e.destination, e.level_triggered, e.masked), (0x41, 3, true, false));
    /// ```
    pub fn from_raw(raw: u64) -> Self {
        RedirectionEntry {
            vector: (raw & RTE_VECTOR) as u8,
            delivery_mode: ((raw >> 8) & 7) as u8,
            logical_destination: raw & RTE_DEST_LOGICAL != 0,
            active_low: raw & (1 << 13) != 0,
            remote_irr: raw & RTE_REMOTE_IRR != 0,
            level_triggered: raw & RTE_LEVEL != 0,
            masked: raw & RTE_MASKED != 0,
            destination: (raw >> 56) as u8,
        }
    }

    /// The MSI this entry sends, or `None` when it sends nothing (masked, or a delivery mode
    /// that has no meaning here: reserved 3 and 6, ExtINT 7).
    ///
    /// Address `0xFEE0_0000 | destination << 12 | logical << 2`; data
    /// `vector | delivery_mode << 8 | level << 15 | (level ? assert << 14 : 0)`.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::legacy::ioapic::RedirectionEntry;
    /// let msi = RedirectionEntry::from_raw(0x0200_0000_0000_0040).msi().unwrap();
    /// assert_eq!((msi.address, msi.data), (0xfee0_2000, 0x40));
    /// assert!(RedirectionEntry::from_raw(0x1_0040).msi().is_none(), "masked");
    /// ```
    pub fn msi(&self) -> Option<Msi> {
        if self.masked || matches!(self.delivery_mode, 3 | 6 | 7) {
            return None;
        }
        let address = MSI_ADDRESS_BASE
            | u64::from(self.destination) << 12
            | u64::from(self.logical_destination) << 2;
        let mut data = u32::from(self.vector) | u32::from(self.delivery_mode) << 8;
        if self.level_triggered {
            data |= 1 << 15 | 1 << 14;
        }
        Some(Msi {
            address,
            data,
            devid: None,
        })
    }
}

/// The userspace IOAPIC: a [`BusDevice`] for its MMIO window plus the line-state and EOI
/// entry points the VMM and level-triggered devices use. See the [module docs](self).
///
/// # Example
/// ```no_run
/// use std::sync::{Arc, Mutex};
/// use smolvm::devices::legacy::Ioapic;
/// use smolvm::hypervisor::IrqchipMode;
///
/// let vm = smolvm::hypervisor::open()?.create_vm()?;
/// vm.create_irqchip(IrqchipMode::Split)?;
/// let ioapic = Arc::new(Mutex::new(Ioapic::new(vm.clone())));
/// // Put it on the MMIO bus at layout::IOAPIC_START; forward VmExit::IoapicEoi to it; a
/// // level-triggered device then reports its line:
/// let mut ioapic = ioapic.lock().unwrap();
/// ioapic.set_line(11, true)?;
/// assert!(ioapic.line(11));
/// // Until the guest programs pin 11 it stays masked: nothing is routed or delivered.
/// assert!(ioapic.redirection_entry(11).unwrap().masked);
/// assert!(ioapic.routes().is_empty());
/// assert_eq!(ioapic.state().lines, 1 << 11);
/// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
/// ```
pub struct Ioapic {
    vm: Arc<dyn Vm>,
    state: IoapicState,
    /// The routing table last handed to the VM (`None`: never pushed, or the push failed).
    pushed: Option<Vec<GsiRoute>>,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Ioapic {
    /// An IOAPIC in its reset state (all pins masked) that routes through `vm`, whose irqchip
    /// must be split. Nothing is pushed to the VM until the guest unmasks a pin.
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        Self::from_state(vm, IoapicState::default())
    }

    /// An IOAPIC with a saved state. Call [`Ioapic::sync_routes`] to hand its routes to the VM.
    ///
    /// # Example
    /// ```
    /// use std::sync::Arc;
    /// use smolvm::devices::legacy::Ioapic;
    /// use smolvm::hypervisor::{HypervisorError, Vm};
    ///
    /// /// Moves the guest's IOAPIC to `new_vm`, which has a split irqchip too.
    /// fn restore(old: &Ioapic, new_vm: Arc<dyn Vm>) -> Result<Ioapic, HypervisorError> {
    ///     let mut ioapic = Ioapic::from_state(new_vm, old.state());
    ///     ioapic.sync_routes()?; // the guest's routes are live again
    ///     Ok(ioapic)
    /// }
    /// ```
    pub fn from_state(vm: Arc<dyn Vm>, mut state: IoapicState) -> Self {
        state.id &= 0xf;
        state.lines &= (1 << IOAPIC_NUM_PINS) - 1;
        Ioapic {
            vm,
            state,
            pushed: None,
        }
    }

    /// A copy of the current state.
    pub fn state(&self) -> IoapicState {
        self.state
    }

    /// Pin `pin`'s RTE decoded, or `None` for a pin that does not exist.
    pub fn redirection_entry(&self, pin: usize) -> Option<RedirectionEntry> {
        self.state
            .redirection
            .get(pin)
            .map(|&raw| RedirectionEntry::from_raw(raw))
    }

    /// The routing table the current RTEs describe: one MSI route per pin that sends
    /// something (GSI = pin number), in pin order.
    pub fn routes(&self) -> Vec<GsiRoute> {
        (0..IOAPIC_NUM_PINS)
            .filter_map(|pin| {
                let msi = RedirectionEntry::from_raw(self.state.redirection[pin]).msi()?;
                Some(GsiRoute::msi(pin as u32, msi))
            })
            .collect()
    }

    /// Hands the routing table to the VM if it differs from the last one handed over.
    ///
    /// # Errors
    /// The backend rejected the table; the next change (or call) tries again.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::legacy::Ioapic;
    /// use smolvm::hypervisor::IrqchipMode;
    /// let vm = smolvm::hypervisor::open()?.create_vm()?;
    /// vm.create_irqchip(IrqchipMode::Split)?;
    /// let mut ioapic = Ioapic::new(vm);
    /// ioapic.sync_routes()?; // pushes the (empty) table: every pin is masked
    /// ioapic.sync_routes()?; // unchanged: no backend call
    /// # Ok::<(), smolvm::hypervisor::HypervisorError>(())
    /// ```
    pub fn sync_routes(&mut self) -> Result<(), HypervisorError> {
        let routes = self.routes();
        if self.pushed.as_ref() == Some(&routes) {
            return Ok(());
        }
        self.pushed = None;
        self.vm.set_gsi_routing(&routes)?;
        self.pushed = Some(routes);
        Ok(())
    }

    /// Sets the logical state of pin `pin` (`true` = asserted), for level-triggered devices.
    ///
    /// - Level-triggered, unmasked pin: asserting it while remote IRR is clear delivers the
    ///   interrupt and sets remote IRR. While remote IRR is set nothing more is delivered; the
    ///   guest's EOI ([`Ioapic::end_of_interrupt`]) clears it and, if the line is still
    ///   asserted, delivers again. De-asserting only records the state.
    /// - Edge-triggered, unmasked pin: a low→high transition delivers once.
    /// - Masked pin: only the state is recorded; unmasking a level pin whose line is asserted
    ///   delivers then.
    ///
    /// Pins beyond 23 are ignored.
    ///
    /// # Errors
    /// Delivering through the VM failed.
    pub fn set_line(&mut self, pin: u32, asserted: bool) -> Result<(), HypervisorError> {
        let Some(&raw) = self.state.redirection.get(pin as usize) else {
            return Ok(());
        };
        let bit = 1u32 << pin;
        let was = self.state.lines & bit != 0;
        if asserted {
            self.state.lines |= bit;
        } else {
            self.state.lines &= !bit;
        }
        let e = RedirectionEntry::from_raw(raw);
        if !asserted || e.masked {
            return Ok(());
        }
        if e.level_triggered {
            self.deliver_level(pin as usize)
        } else if !was {
            self.fire(pin)
        } else {
            Ok(())
        }
    }

    /// Whether pin `pin` is asserted (as last set with [`Ioapic::set_line`]).
    pub fn line(&self, pin: u32) -> bool {
        pin < IOAPIC_NUM_PINS as u32 && self.state.lines & (1 << pin) != 0
    }

    /// The guest EOI'd `vector` (from [`VmExit::IoapicEoi`](crate::hypervisor::VmExit::IoapicEoi)
    /// or the EOI register): clears remote IRR of every level-triggered pin with that vector
    /// and delivers again on those whose line is still asserted and unmasked.
    ///
    /// # Errors
    /// Re-delivering through the VM failed (every pin is still handled).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::legacy::Ioapic;
    /// use smolvm::hypervisor::{Vcpu, VmExit};
    /// fn run_once(vcpu: &mut dyn Vcpu, ioapic: &mut Ioapic) -> smolvm::hypervisor::Result<()> {
    ///     if let VmExit::IoapicEoi { vector } = vcpu.run()? {
    ///         ioapic.end_of_interrupt(vector)?;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub fn end_of_interrupt(&mut self, vector: u8) -> Result<(), HypervisorError> {
        let mut result = Ok(());
        for pin in 0..IOAPIC_NUM_PINS {
            let raw = self.state.redirection[pin];
            if raw & RTE_VECTOR != u64::from(vector) || raw & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.state.redirection[pin] &= !RTE_REMOTE_IRR;
            if raw & RTE_LEVEL != 0 {
                if let Err(e) = self.deliver_level(pin) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Delivers on level pin `pin` if its line is asserted, it is unmasked and remote IRR is
    /// clear; sets remote IRR when it does.
    fn deliver_level(&mut self, pin: usize) -> Result<(), HypervisorError> {
        let raw = self.state.redirection[pin];
        if self.state.lines & (1 << pin) == 0
            || raw & (RTE_MASKED | RTE_REMOTE_IRR) != 0
            || raw & RTE_LEVEL == 0
        {
            return Ok(());
        }
        self.state.redirection[pin] |= RTE_REMOTE_IRR;
        self.fire(pin as u32)
    }

    /// Sends pin `pin`'s route once. The route must be in the VM's table: push first.
    fn fire(&mut self, pin: u32) -> Result<(), HypervisorError> {
        if self.pushed.is_none() {
            self.sync_routes()?;
        }
        // Raising a GSI whose route is an MSI sends the message; lowering it does nothing,
        // but keeps the generic "edge = raise, lower" contract of `Vm::set_irq_line`.
        self.vm.set_irq_line(pin, true)?;
        self.vm.set_irq_line(pin, false)
    }

    fn read_indirect(&self) -> u32 {
        let sel = u32::from(self.state.select);
        match sel {
            IND_ID | IND_ARB => u32::from(self.state.id & 0xf) << 24,
            IND_VER => (IOAPIC_NUM_PINS as u32 - 1) << 16 | IOAPIC_VERSION,
            _ => match self.rte_index(sel) {
                Some((pin, high)) => {
                    let raw = self.state.redirection[pin];
                    if high {
                        (raw >> 32) as u32
                    } else {
                        raw as u32
                    }
                }
                None => u32::MAX,
            },
        }
    }

    fn write_indirect(&mut self, value: u32) {
        let sel = u32::from(self.state.select);
        match sel {
            IND_ID => self.state.id = ((value >> 24) & 0xf) as u8,
            IND_VER | IND_ARB => {}
            _ => {
                let Some((pin, high)) = self.rte_index(sel) else {
                    log::debug!("ioapic: write {value:#x} to unknown register {sel:#x}");
                    return;
                };
                let old = self.state.redirection[pin];
                let mut new = if high {
                    (old & 0xffff_ffff) | u64::from(value) << 32
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                new = (new & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
                if new & RTE_LEVEL == 0 {
                    // Linux clears a stuck remote IRR by switching a pin to edge and back.
                    new &= !RTE_REMOTE_IRR;
                }
                self.state.redirection[pin] = new;
                if let Err(e) = self.sync_routes() {
                    log::error!("ioapic: routing pin {pin} failed: {e}");
                }
                // Unmasking (or switching to level) a pin whose level line is asserted
                // delivers now, as the hardware does.
                if let Err(e) = self.deliver_level(pin) {
                    log::error!("ioapic: delivering pin {pin} failed: {e}");
                }
            }
        }
    }

    /// (pin, high dword) for an indirect register index in the redirection table.
    fn rte_index(&self, sel: u32) -> Option<(usize, bool)> {
        let i = sel.checked_sub(IND_REDIR_START)? as usize;
        (i / 2 < IOAPIC_NUM_PINS).then_some((i / 2, i % 2 == 1))
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let reg = offset & !3;
        let value = match reg {
            REG_SELECT => u32::from(self.state.select),
            REG_WINDOW => self.read_indirect(),
            // Unknown offsets (and the write-only EOI register) read 0, like KVM's IOAPIC.
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let skip = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(skip + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let value = match data.len() {
            1 => u32::from(data[0]),
            2 => u32::from(u16::from_le_bytes([data[0], data[1]])),
            4 | 8 => u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            n => {
                log::debug!("ioapic: ignoring {n}-byte write at {offset:#x}");
                return;
            }
        };
        match offset {
            REG_SELECT => self.state.select = value as u8,
            REG_WINDOW => self.write_indirect(value),
            REG_EOI => {
                if let Err(e) = self.end_of_interrupt(value as u8) {
                    log::error!("ioapic: EOI of vector {:#x} failed: {e}", value as u8);
                }
            }
            _ => log::debug!("ioapic: ignoring write {value:#x} at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{GsiTarget, IrqchipMode, IrqchipOrder, MemoryRegion};
    use std::sync::Mutex;

    /// A VM that records routing tables and fired GSIs.
    #[derive(Default)]
    struct Recorder {
        tables: Mutex<Vec<Vec<GsiRoute>>>,
        fired: Mutex<Vec<u32>>,
        fail_routing: std::sync::atomic::AtomicBool,
    }

    impl Vm for Recorder {
        unsafe fn map_memory(&self, _: MemoryRegion) -> crate::hypervisor::Result<()> {
            unimplemented!()
        }
        fn unmap_memory(&self, _: MemoryRegion) -> crate::hypervisor::Result<()> {
            unimplemented!()
        }
        fn irqchip_order(&self) -> IrqchipOrder {
            IrqchipOrder::BeforeVcpus
        }
        fn create_irqchip(&self, _: IrqchipMode) -> crate::hypervisor::Result<()> {
            Ok(())
        }
        fn set_irq_line(&self, gsi: u32, level: bool) -> crate::hypervisor::Result<()> {
            if level {
                self.fired.lock().unwrap().push(gsi);
            }
            Ok(())
        }
        fn set_gsi_routing(&self, routes: &[GsiRoute]) -> crate::hypervisor::Result<()> {
            if self.fail_routing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(HypervisorError::Unsupported("test"));
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
        fn create_vcpu(
            &self,
            _: u32,
        ) -> crate::hypervisor::Result<Box<dyn crate::hypervisor::Vcpu>> {
            unimplemented!()
        }
    }

    fn ioapic() -> (Ioapic, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Ioapic::new(rec.clone()), rec)
    }

    fn write32(io: &mut Ioapic, offset: u64, v: u32) {
        io.write(layout::IOAPIC_START, offset, &v.to_le_bytes());
    }

    fn read32(io: &mut Ioapic, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        io.read(layout::IOAPIC_START, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_reg(io: &mut Ioapic, reg: u32, v: u32) {
        write32(io, REG_SELECT, reg);
        write32(io, REG_WINDOW, v);
    }

    fn get_reg(io: &mut Ioapic, reg: u32) -> u32 {
        write32(io, REG_SELECT, reg);
        read32(io, REG_WINDOW)
    }

    fn program(io: &mut Ioapic, pin: u32, rte: u64) {
        set_reg(io, 0x11 + 2 * pin, (rte >> 32) as u32);
        set_reg(io, 0x10 + 2 * pin, rte as u32);
    }

    fn last_table(rec: &Recorder) -> Vec<GsiRoute> {
        rec.tables
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    fn fired(rec: &Recorder) -> Vec<u32> {
        std::mem::take(&mut *rec.fired.lock().unwrap())
    }

    #[test]
    fn id_version_arbitration_and_select() {
        let (mut io, _) = ioapic();
        assert_eq!(get_reg(&mut io, IND_VER), 0x0017_0020);
        assert_eq!(get_reg(&mut io, IND_ID), 0);
        set_reg(&mut io, IND_ID, 0xffff_ffff);
        assert_eq!(
            get_reg(&mut io, IND_ID),
            0x0f00_0000,
            "4-bit id, other bits read 0"
        );
        assert_eq!(get_reg(&mut io, IND_ARB), 0x0f00_0000);
        set_reg(&mut io, IND_VER, 0);
        assert_eq!(get_reg(&mut io, IND_VER), 0x0017_0020, "VER is read-only");
        write32(&mut io, REG_SELECT, 0x1234_5625);
        assert_eq!(read32(&mut io, REG_SELECT), 0x25, "IOREGSEL keeps 8 bits");
        assert_eq!(io.state().id, 0xf);
    }

    #[test]
    fn redirection_entries_read_back_with_read_only_bits_kept() {
        let (mut io, _) = ioapic();
        // Pins start masked.
        assert_eq!(get_reg(&mut io, 0x10), 0x1_0000);
        assert_eq!(get_reg(&mut io, 0x11), 0);
        set_reg(&mut io, 0x10 + 2 * 23, 0xffff_ffff);
        set_reg(&mut io, 0x11 + 2 * 23, 0xab00_0000);
        let low = get_reg(&mut io, 0x10 + 2 * 23);
        assert_eq!(
            low & (1 << 12 | 1 << 14),
            0,
            "delivery status and remote IRR are RO"
        );
        assert_eq!(low | (1 << 12 | 1 << 14), 0xffff_ffff);
        assert_eq!(get_reg(&mut io, 0x11 + 2 * 23), 0xab00_0000);
        assert_eq!(io.redirection_entry(23).unwrap().destination, 0xab);
        assert!(io.redirection_entry(24).is_none());
    }

    #[test]
    fn rte_to_msi_encoding() {
        let (mut io, rec) = ioapic();
        // Fixed, physical, edge, unmasked, vector 0x40 to APIC 0.
        program(&mut io, 10, 0x40);
        // Lowest priority, logical, level, to logical set 0x0f, vector 0x51.
        program(
            &mut io,
            4,
            0x0f00_0000_0000_0000 | 1 << 15 | 1 << 11 | 1 << 8 | 0x51,
        );
        // NMI to APIC 3.
        program(&mut io, 2, 0x0300_0000_0000_0000 | 4 << 8);
        let table = last_table(&rec);
        assert_eq!(
            table,
            vec![
                GsiRoute::msi(
                    2,
                    Msi {
                        address: 0xfee0_3000,
                        data: 0x400,
                        devid: None
                    }
                ),
                GsiRoute::msi(
                    4,
                    Msi {
                        address: 0xfee0_f004,
                        data: 0x51 | 1 << 8 | 1 << 15 | 1 << 14,
                        devid: None
                    }
                ),
                GsiRoute::msi(
                    10,
                    Msi {
                        address: 0xfee0_0000,
                        data: 0x40,
                        devid: None
                    }
                ),
            ]
        );
        assert!(matches!(table[0].target, GsiTarget::Msi(_)));
    }

    #[test]
    fn masked_and_meaningless_pins_get_no_route() {
        let (mut io, rec) = ioapic();
        program(&mut io, 1, 0x41);
        assert_eq!(last_table(&rec).len(), 1);
        program(&mut io, 1, 0x41 | RTE_MASKED);
        assert!(last_table(&rec).is_empty(), "masking removes the route");
        for mode in [3u64, 6, 7] {
            program(&mut io, 5, 0x30 | mode << 8);
            assert!(last_table(&rec).is_empty(), "delivery mode {mode}");
        }
        // A low vector is routed as programmed.
        program(&mut io, 6, 0x05);
        let t = last_table(&rec);
        assert_eq!(t.len(), 1);
        assert!(matches!(t[0].target, GsiTarget::Msi(m) if m.data == 0x05));
    }

    #[test]
    fn routing_is_pushed_only_when_it_changes() {
        let (mut io, rec) = ioapic();
        // Writing the high dword of a masked pin changes nothing routable... but the first
        // write pushes the (empty) table once.
        set_reg(&mut io, 0x11, 0x0100_0000);
        let n = rec.tables.lock().unwrap().len();
        assert_eq!(n, 1);
        set_reg(&mut io, 0x11, 0x0200_0000);
        assert_eq!(
            rec.tables.lock().unwrap().len(),
            1,
            "masked pin: same table"
        );
        set_reg(&mut io, 0x10, 0x33);
        assert_eq!(rec.tables.lock().unwrap().len(), 2);
        set_reg(&mut io, 0x10, 0x33);
        assert_eq!(rec.tables.lock().unwrap().len(), 2, "same RTE: no push");
        set_reg(&mut io, 0x11, 0x0100_0000);
        assert_eq!(
            rec.tables.lock().unwrap().len(),
            3,
            "destination change pushes"
        );
        assert!(
            matches!(last_table(&rec)[0].target, GsiTarget::Msi(m) if m.address == 0xfee0_1000)
        );
    }

    #[test]
    fn failed_push_is_retried_on_the_next_change() {
        let (mut io, rec) = ioapic();
        rec.fail_routing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        program(&mut io, 3, 0x40);
        assert!(rec.tables.lock().unwrap().is_empty());
        rec.fail_routing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        io.sync_routes().unwrap();
        assert_eq!(last_table(&rec).len(), 1);
    }

    #[test]
    fn edge_pins_fire_on_rising_edges_only() {
        let (mut io, rec) = ioapic();
        io.set_line(10, true).unwrap();
        assert!(fired(&rec).is_empty(), "masked");
        io.set_line(10, false).unwrap();
        program(&mut io, 10, 0x40);
        io.set_line(10, true).unwrap();
        io.set_line(10, true).unwrap();
        assert_eq!(fired(&rec), vec![10]);
        io.set_line(10, false).unwrap();
        io.set_line(10, true).unwrap();
        assert_eq!(fired(&rec), vec![10]);
        assert!(
            !io.redirection_entry(10).unwrap().remote_irr,
            "edge: no remote IRR"
        );
        io.set_line(99, true).unwrap();
        assert!(!io.line(99));
    }

    #[test]
    fn level_pins_use_remote_irr_and_refire_after_eoi() {
        let (mut io, rec) = ioapic();
        program(&mut io, 11, RTE_LEVEL | 0x52);
        io.set_line(11, true).unwrap();
        assert_eq!(fired(&rec), vec![11]);
        assert!(io.redirection_entry(11).unwrap().remote_irr);
        assert_eq!(
            get_reg(&mut io, 0x10 + 22) & (1 << 14),
            1 << 14,
            "guest sees IRR"
        );
        // Still asserted, IRR set: nothing more.
        io.set_line(11, true).unwrap();
        assert!(fired(&rec).is_empty());
        // EOI of another vector changes nothing.
        io.end_of_interrupt(0x53).unwrap();
        assert!(fired(&rec).is_empty());
        // EOI while still asserted: delivered again, IRR set again.
        io.end_of_interrupt(0x52).unwrap();
        assert_eq!(fired(&rec), vec![11]);
        assert!(io.redirection_entry(11).unwrap().remote_irr);
        // Device de-asserts, then the guest EOIs: IRR clear, nothing delivered.
        io.set_line(11, false).unwrap();
        io.end_of_interrupt(0x52).unwrap();
        assert!(fired(&rec).is_empty());
        assert!(!io.redirection_entry(11).unwrap().remote_irr);
        // The EOI register works too.
        io.set_line(11, true).unwrap();
        assert_eq!(fired(&rec), vec![11]);
        write32(&mut io, REG_EOI, 0x52);
        assert_eq!(fired(&rec), vec![11]);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let (mut io, rec) = ioapic();
        program(&mut io, 7, RTE_LEVEL | RTE_MASKED | 0x60);
        io.set_line(7, true).unwrap();
        assert!(fired(&rec).is_empty());
        program(&mut io, 7, RTE_LEVEL | 0x60);
        assert_eq!(fired(&rec), vec![7]);
        // Route must be in the VM's table before the delivery.
        assert_eq!(last_table(&rec).len(), 1);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let (mut io, rec) = ioapic();
        program(&mut io, 9, RTE_LEVEL | 0x70);
        io.set_line(9, true).unwrap();
        assert_eq!(fired(&rec), vec![9]);
        program(&mut io, 9, 0x70);
        assert!(!io.redirection_entry(9).unwrap().remote_irr);
        // Back to level with the line still asserted: delivered again.
        program(&mut io, 9, RTE_LEVEL | 0x70);
        assert_eq!(fired(&rec), vec![9]);
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let (mut io, _) = ioapic();
        // Unknown indirect registers read all-ones, unknown offsets 0.
        for reg in [3u32, 0xf, 0x40, 0xff] {
            assert_eq!(get_reg(&mut io, reg), u32::MAX, "register {reg:#x}");
            set_reg(&mut io, reg, 0x1234);
        }
        assert_eq!(read32(&mut io, 0x20), 0);
        assert_eq!(read32(&mut io, REG_EOI), 0);
        assert_eq!(read32(&mut io, 0xffc), 0);
        // Every size at every offset of the window, plus past it.
        for offset in (0..0x50).chain([0xfff, 0x1000, u64::MAX]) {
            for len in 0..=9 {
                let mut b = vec![0x5a; len];
                io.read(0, offset, &mut b);
                io.write(0, offset, &b);
            }
        }
        // Byte reads slice the register.
        write32(&mut io, REG_SELECT, IND_VER);
        let mut b = [0u8; 1];
        io.read(0, REG_WINDOW + 2, &mut b);
        assert_eq!(b, [0x17]);
        let mut b = [0u8; 8];
        io.read(0, REG_WINDOW, &mut b);
        assert_eq!(b, [0x20, 0, 0x17, 0, 0, 0, 0, 0]);
        // Narrow writes zero-extend; an 8-byte write uses the low dword.
        io.write(0, REG_SELECT, &[0x12]);
        assert_eq!(io.state().select, 0x12);
        io.write(0, REG_SELECT, &0xdead_0000_0000_0010u64.to_le_bytes());
        assert_eq!(io.state().select, 0x10);
        // Lines and EOIs for every vector on garbage state.
        for v in 0..=255u8 {
            io.end_of_interrupt(v).unwrap();
        }
    }

    #[test]
    fn state_round_trips() {
        let (mut io, rec) = ioapic();
        program(&mut io, 11, RTE_LEVEL | 0x52);
        io.set_line(11, true).unwrap();
        let s = io.state();
        let mut copy = Ioapic::from_state(rec.clone(), s);
        assert_eq!(copy.state(), s);
        copy.sync_routes().unwrap();
        assert_eq!(last_table(&rec).len(), 1);
        fired(&rec);
        copy.end_of_interrupt(0x52).unwrap();
        assert_eq!(fired(&rec), vec![11], "restored IRR and line re-fire");
        let odd = IoapicState {
            id: 0xff,
            lines: u32::MAX,
            ..IoapicState::default()
        };
        let io = Ioapic::from_state(rec, odd);
        assert_eq!(io.state().id, 0xf);
        assert!(!io.line(24));
    }
}

//! The Intel MultiProcessor Specification (1.4) table: how a kernel without ACPI learns about
//! the CPUs, the IOAPIC and how ISA interrupts are wired.
//!
//! Two pieces, in two places:
//! - the 16-byte floating pointer ("_MP_") at [`EBDA_START`], where Linux looks for it (it
//!   scans the first KiB of the EBDA, the last KiB of base memory and the BIOS area);
//! - the configuration table ("PCMP") it points to, at [`MPTABLE_CONFIG_START`] in the BIOS
//!   area, which has room for [`MAX_VCPUS`] processor entries.
//!
//! Both lie in `[EBDA_START, HIMEM_START)`, which the e820 map reports reserved.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{
    APIC_START, EBDA_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_CONFIG_END, MPTABLE_CONFIG_START,
};
use crate::boot::BootError;
use crate::memory::GuestMemory;

/// Floating pointer structure size.
const MPF_SIZE: usize = 16;
/// Configuration table header size.
const MPC_HEADER_SIZE: usize = 44;
/// Processor entry size.
const CPU_ENTRY_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entry size.
const SMALL_ENTRY_SIZE: usize = 8;
/// Entries besides the processors: bus, IOAPIC, one I/O interrupt per IOAPIC pin, two local
/// interrupts.
const OTHER_ENTRIES: usize = 1 + 1 + IOAPIC_PINS as usize + 2;
/// Configuration table bytes not depending on the CPU count.
const FIXED_SIZE: usize = MPC_HEADER_SIZE + OTHER_ENTRIES * SMALL_ENTRY_SIZE;

/// Most vCPUs the table describes: APIC ids are 8 bits, 0xff is the broadcast id and the
/// IOAPIC takes the id after the last CPU's, so CPUs get ids `0..=253`.
pub const MAX_VCPUS: u32 = 254;

// The largest configuration table must fit its area (and its 16-bit length field).
const _: () = assert!(
    FIXED_SIZE + MAX_VCPUS as usize * CPU_ENTRY_SIZE
        <= (MPTABLE_CONFIG_END - MPTABLE_CONFIG_START) as usize
);
const _: () = assert!(FIXED_SIZE + MAX_VCPUS as usize * CPU_ENTRY_SIZE <= u16::MAX as usize);

/// MP spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Local APIC / IOAPIC version reported (that of an integrated xAPIC, as KVM emulates).
const APIC_VERSION: u8 = 0x14;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// CPU signature (family 6) and feature flags (FPU, APIC) reported per processor.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;
/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// IOAPIC flag: usable.
const MPC_APIC_USABLE: u8 = 1;

/// The two MP structures, ready to be written into guest memory.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::mptable;
/// let t = mptable::build(4).unwrap();
/// // The configuration table's length field covers the whole table, which sums to 0.
/// assert_eq!(usize::from(u16::from_le_bytes([t.config[4], t.config[5]])), t.config.len());
/// assert_eq!(t.config.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpTable {
    /// The floating pointer structure, for [`EBDA_START`]; it points at
    /// [`MPTABLE_CONFIG_START`].
    pub floating_pointer: [u8; MPF_SIZE],
    /// The configuration table with its entries, for [`MPTABLE_CONFIG_START`].
    pub config: Vec<u8>,
}

/// Builds floating pointer + configuration table for `vcpus` CPUs (APIC ids `0..vcpus`, CPU 0
/// the boot processor), one ISA bus, the IOAPIC (id `vcpus`) with ISA IRQ *n* on pin *n* for
/// every pin, ExtINT on LINT0 of the BSP (the 8259 path) and NMI on LINT1 of all CPUs.
///
/// # Errors
/// [`BootError::TooManyVcpus`] for 0 or more than [`MAX_VCPUS`] CPUs.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{layout, mptable};
/// let t = mptable::build(2).unwrap();
/// assert_eq!(&t.floating_pointer[..4], b"_MP_");
/// assert_eq!(t.floating_pointer[4..8], (layout::MPTABLE_CONFIG_START as u32).to_le_bytes());
/// assert_eq!(&t.config[..4], b"PCMP");
/// assert!(mptable::build(mptable::MAX_VCPUS).is_ok());
/// assert!(mptable::build(mptable::MAX_VCPUS + 1).is_err());
/// ```
pub fn build(vcpus: u32) -> Result<MpTable, BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let ncpu = vcpus as u8; // <= MAX_VCPUS < 255
    let ioapic_id = ncpu;

    let mut entries: Vec<u8> =
        Vec::with_capacity(FIXED_SIZE - MPC_HEADER_SIZE + vcpus as usize * CPU_ENTRY_SIZE);
    for id in 0..ncpu {
        entries.extend_from_slice(&[
            MP_PROCESSOR,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS as u8 {
        // Type, flags (conforming polarity/trigger), source bus 0 IRQ, destination IOAPIC pin.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = vcpus as u16 + OTHER_ENTRIES as u16;

    let mut config = Vec::with_capacity(MPC_HEADER_SIZE + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((MPC_HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    config.extend_from_slice(&[MP_SPEC_REV, 0]); // checksum patched below
    config.extend_from_slice(b"SMOLVM  ");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + rsvd
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);
    debug_assert_eq!(config.len(), FIXED_SIZE + vcpus as usize * CPU_ENTRY_SIZE);

    let mut floating_pointer = [0u8; MPF_SIZE];
    floating_pointer[..4].copy_from_slice(b"_MP_");
    floating_pointer[4..8].copy_from_slice(&(MPTABLE_CONFIG_START as u32).to_le_bytes());
    // Length in 16-byte units, spec revision, checksum (patched below), features 1-5 (0: a
    // configuration table is present).
    floating_pointer[8..10].copy_from_slice(&[1, MP_SPEC_REV]);
    floating_pointer[10] = checksum(&floating_pointer);
    Ok(MpTable {
        floating_pointer,
        config,
    })
}

/// Builds the table for `vcpus` CPUs (see [`build`]) and writes the floating pointer at
/// [`EBDA_START`] and the configuration table at [`MPTABLE_CONFIG_START`].
///
/// # Errors
/// [`BootError::TooManyVcpus`] for 0 or more than [`MAX_VCPUS`] CPUs,
/// [`BootError::GuestMemory`] if guest memory does not cover both places (it needs the
/// first MiB).
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{layout, mptable};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// mptable::setup_mptable(&mem, 4).unwrap();
/// ```
pub fn setup_mptable(mem: &GuestMemory, vcpus: u32) -> Result<(), BootError> {
    let table = build(vcpus)?;
    mem.write_slice(&table.floating_pointer, GuestAddress(EBDA_START))
        .map_err(|_| BootError::GuestMemory {
            what: "MP floating pointer",
            addr: EBDA_START,
        })?;
    mem.write_slice(&table.config, GuestAddress(MPTABLE_CONFIG_START))
        .map_err(|_| BootError::GuestMemory {
            what: "MP configuration table",
            addr: MPTABLE_CONFIG_START,
        })
}

/// The byte that makes `bytes` (with it in place of a zero) sum to 0 mod 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, &b| acc.wrapping_add(b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Parses the table from guest memory the way Linux does; returns (cpus, bsp ids, entries
    /// by type).
    fn parse(mem: &GuestMemory) -> (Vec<(u8, u8)>, [usize; 5], u8) {
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        assert_eq!((mpf[8], mpf[9]), (1, 4));
        assert_eq!(
            &mpf[11..],
            &[0; 5],
            "features: a configuration table is present"
        );
        let phys = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
        assert_eq!(phys, MPTABLE_CONFIG_START);
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(phys)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let count = u16::from_le_bytes([hdr[34], hdr[35]]) as usize;
        assert_eq!(
            u32::from_le_bytes(hdr[36..40].try_into().unwrap()) as u64,
            APIC_START
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(phys)).unwrap();
        assert_eq!(sum(&table), 0, "table checksum");
        assert!(phys + len as u64 <= MPTABLE_CONFIG_END);
        // Both structures lie in a range the e820 map reports reserved.
        let map = crate::arch::x86_64::memmap::memory_map(mem);
        for (start, end) in [(EBDA_START, EBDA_START + 16), (phys, phys + len as u64)] {
            assert!(
                map.iter()
                    .any(|e| e.kind == crate::arch::x86_64::memmap::E820_RESERVED
                        && e.addr <= start
                        && end <= e.addr + e.size),
                "[{start:#x}, {end:#x}) not reserved in {map:x?}"
            );
        }
        let (mut pos, mut cpus, mut by_type, mut ioapic_id) = (44, vec![], [0usize; 5], 0);
        for _ in 0..count {
            let t = table[pos];
            by_type[t as usize] += 1;
            match t {
                MP_PROCESSOR => {
                    cpus.push((table[pos + 1], table[pos + 3]));
                    pos += 20;
                }
                MP_IOAPIC => {
                    ioapic_id = table[pos + 1];
                    let addr = u32::from_le_bytes(table[pos + 4..pos + 8].try_into().unwrap());
                    assert_eq!(addr as u64, IOAPIC_START);
                    pos += 8;
                }
                MP_INTSRC => {
                    assert_eq!(table[pos + 5], table[pos + 7], "ISA IRQ n on pin n");
                    assert_eq!(table[pos + 6], ioapic_id);
                    pos += 8;
                }
                _ => pos += 8,
            }
        }
        assert_eq!(pos, len, "entry count matches length");
        (cpus, by_type, ioapic_id)
    }

    #[test]
    fn tables_for_1_2_8_254_cpus() {
        for n in [1u32, 2, 8, 254] {
            let mem = crate::memory::create(&[(GuestAddress(0), 2 << 20)]).unwrap();
            setup_mptable(&mem, n).unwrap();
            let (cpus, by_type, ioapic_id) = parse(&mem);
            assert_eq!(cpus.len(), n as usize);
            for (i, &(id, flags)) in cpus.iter().enumerate() {
                assert_eq!(id as usize, i);
                let bsp = if i == 0 { CPU_BOOTPROCESSOR } else { 0 };
                assert_eq!(flags, CPU_ENABLED | bsp);
            }
            assert_eq!(by_type, [n as usize, 1, 1, 24, 2]);
            assert_eq!(ioapic_id as u32, n);
        }
    }

    #[test]
    fn too_many_or_zero_vcpus() {
        assert_eq!(MAX_VCPUS, 254);
        assert!(
            matches!(build(MAX_VCPUS + 1), Err(BootError::TooManyVcpus(n)) if n == MAX_VCPUS + 1)
        );
        assert!(matches!(build(255), Err(BootError::TooManyVcpus(255))));
        assert!(matches!(build(0), Err(BootError::TooManyVcpus(0))));
    }

    #[test]
    fn needs_the_first_mib() {
        // Memory ending inside the BIOS area holds the floating pointer but not the table.
        let mem = crate::memory::create(&[(GuestAddress(0), 0xf0800)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, MAX_VCPUS),
            Err(BootError::GuestMemory { addr, .. }) if addr == MPTABLE_CONFIG_START
        ));
    }

    #[test]
    fn local_interrupts() {
        let t = build(1).unwrap().config;
        let lint = &t[t.len() - 16..];
        assert_eq!(&lint[..8], &[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&lint[8..], &[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    }
}

//! The boot GDT and its conversion to segment registers.
//!
//! The kernel replaces this GDT almost immediately; it only has to describe the segments the
//! vCPU is entered with, because KVM loads segment registers with their hidden descriptor
//! cache filled from [`Segment`] and never reads the table itself until the guest reloads a
//! selector.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{BOOT_GDT_START, BOOT_IDT_START};
use crate::boot::BootError;
use crate::hypervisor::arch::x86_64::{DescriptorTable, Segment};
use crate::memory::GuestMemory;

/// Selector of the code segment (GDT index 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (GDT index 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task state segment (GDT index 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// GDT for 64-bit entry (Linux boot protocol): null, 64-bit code (`0xa09b`: present, L=1,
/// G=1, execute/read accessed), flat data (`0xc093`), TSS (`0x808b`, busy), as Firecracker.
pub const GDT_64BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for PVH entry, which the PVH ABI defines as 32-bit protected mode: null, flat 32-bit
/// code (`0xc09b`: present, D=1, G=1), flat data (`0xc093`), 32-bit busy TSS with limit 0x67
/// (`0x008b`) as the PVH spec describes.
pub const GDT_32BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Encodes a segment descriptor from `flags` (access byte in bits 0-7, G/DB/L/AVL in bits
/// 12-15), a 32-bit `base` and a 20-bit `limit` (in pages when G is set).
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::gdt::gdt_entry;
/// assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
/// ```
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register state for GDT `entry` at table `index`: what the CPU would load into
/// the hidden descriptor cache, with the limit already scaled by the granularity bit.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::gdt::{segment_from_gdt, GDT_64BIT};
/// let cs = segment_from_gdt(GDT_64BIT[1], 1);
/// assert_eq!((cs.selector, cs.type_, cs.l, cs.limit), (0x08, 0xb, true, 0xffff_ffff));
/// ```
pub fn segment_from_gdt(entry: u64, index: u16) -> Segment {
    let bit = |n: u32| (entry >> n) & 1 == 1;
    let raw_limit = ((entry >> 32) & 0x000f_0000) as u32 | (entry & 0xffff) as u32;
    let granularity = bit(55);
    let present = bit(47);
    Segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granularity {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        granularity,
        available: bit(52),
        unusable: !present,
    }
}

/// The GDT entry describing `seg` (inverse of [`segment_from_gdt`] for 32-bit bases).
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::gdt::{gdt_entry_from_segment, segment_from_gdt, GDT_64BIT};
/// assert_eq!(gdt_entry_from_segment(&segment_from_gdt(GDT_64BIT[2], 2)), GDT_64BIT[2]);
/// ```
pub fn gdt_entry_from_segment(seg: &Segment) -> u64 {
    let limit = if seg.granularity {
        seg.limit >> 12
    } else {
        seg.limit
    };
    let flags = u16::from(seg.type_ & 0xf)
        | (u16::from(seg.s) << 4)
        | (u16::from(seg.dpl & 3) << 5)
        | (u16::from(seg.present) << 7)
        | (u16::from(seg.available) << 12)
        | (u16::from(seg.l) << 13)
        | (u16::from(seg.db) << 14)
        | (u16::from(seg.granularity) << 15);
    gdt_entry(flags, seg.base as u32, limit)
}

/// Writes `table` at [`BOOT_GDT_START`] and an empty IDT entry at [`BOOT_IDT_START`], and
/// returns GDTR and IDTR. The IDT limit is 0: any exception before the kernel installs its own
/// IDT becomes a triple fault (a clean VM exit) rather than a jump through garbage.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{gdt, layout};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let (gdtr, idtr) = gdt::write_gdt(&mem, &gdt::GDT_64BIT).unwrap();
/// assert_eq!((gdtr.base, gdtr.limit), (layout::BOOT_GDT_START, 31));
/// assert_eq!((idtr.base, idtr.limit), (layout::BOOT_IDT_START, 0));
/// ```
pub fn write_gdt(
    mem: &GuestMemory,
    table: &[u64; 4],
) -> Result<(DescriptorTable, DescriptorTable), BootError> {
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(|_| BootError::GuestMemory {
            what: "boot GDT",
            addr: BOOT_GDT_START,
        })?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::GuestMemory {
            what: "boot IDT",
            addr: BOOT_IDT_START,
        })?;
    let gdtr = DescriptorTable {
        base: BOOT_GDT_START,
        limit: (bytes.len() - 1) as u16,
    };
    let idtr = DescriptorTable {
        base: BOOT_IDT_START,
        limit: 0,
    };
    Ok((gdtr, idtr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_encodings() {
        assert_eq!(GDT_64BIT[0], 0);
        assert_eq!(GDT_64BIT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_64BIT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_64BIT[3], 0x008f_8b00_0000_ffff);
        assert_eq!(GDT_32BIT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT_32BIT[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode() {
        let cs = segment_from_gdt(GDT_64BIT[1], 1);
        assert_eq!(
            cs,
            Segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: CODE_SELECTOR,
                type_: 0xb,
                present: true,
                dpl: 0,
                db: false,
                s: true,
                l: true,
                granularity: true,
                available: false,
                unusable: false,
            }
        );
        let ds = segment_from_gdt(GDT_64BIT[2], 2);
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.l, ds.s),
            (DATA_SELECTOR, 3, true, false, true)
        );
        let tr = segment_from_gdt(GDT_32BIT[3], 3);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.limit),
            (TSS_SELECTOR, 0xb, false, 0x67)
        );
        let cs32 = segment_from_gdt(GDT_32BIT[1], 1);
        assert_eq!((cs32.db, cs32.l, cs32.limit), (true, false, 0xffff_ffff));
        let null = segment_from_gdt(0, 0);
        assert!(null.unusable && !null.present);
    }

    #[test]
    fn round_trips() {
        for (i, &e) in GDT_64BIT.iter().chain(&GDT_32BIT).enumerate() {
            let seg = segment_from_gdt(e, (i % 4) as u16);
            assert_eq!(gdt_entry_from_segment(&seg), e, "entry {i}");
        }
        let odd = gdt_entry(0x1ff, 0x1234_5678, 0xabcde);
        assert_eq!(gdt_entry_from_segment(&segment_from_gdt(odd, 7)), odd);
        let seg = segment_from_gdt(odd, 7);
        assert_eq!((seg.base, seg.limit, seg.dpl), (0x1234_5678, 0xabcde, 3));
    }

    #[test]
    fn written_table_reads_back() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (gdtr, _) = write_gdt(&mem, &GDT_64BIT).unwrap();
        for (i, &e) in GDT_64BIT.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(gdtr.base + 8 * i as u64))
                .unwrap();
            assert_eq!(got, e);
        }
    }
}

//! Conversions between KVM register structures and the neutral ones.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::hypervisor::arch::x86_64::{DescriptorTable, Registers, Segment, SpecialRegisters};

/// KVM → neutral general purpose registers.
pub fn regs_from_kvm(r: &kvm_regs) -> Registers {
    Registers {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// Neutral → KVM general purpose registers.
pub fn regs_to_kvm(r: &Registers) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        granularity: s.g != 0,
        available: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.granularity.into(),
        avl: s.available.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

/// KVM → neutral special registers.
pub fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: dt_from_kvm(&s.gdt),
        idt: dt_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Writes neutral special registers over `k`, keeping `k`'s APIC base when the neutral value
/// is 0 (boot code does not choose it) and KVM's pending-interrupt bitmap untouched.
pub fn sregs_to_kvm(s: &SpecialRegisters, k: &mut kvm_sregs) {
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt = dt_to_kvm(&s.gdt);
    k.idt = dt_to_kvm(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    if s.apic_base != 0 {
        k.apic_base = s.apic_base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_registers_round_trip() {
        let cs = Segment {
            base: 0,
            limit: 0xfffff,
            selector: 0x8,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            granularity: true,
            available: false,
            unusable: false,
        };
        let n = SpecialRegisters {
            cs,
            gdt: DescriptorTable {
                base: 0x500,
                limit: 31,
            },
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        let mut k = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        sregs_to_kvm(&n, &mut k);
        assert_eq!(k.apic_base, 0xfee0_0900, "a zero APIC base keeps KVM's");
        let back = sregs_from_kvm(&k);
        assert_eq!(back.cs, n.cs);
        assert_eq!(back.gdt, n.gdt);
        assert_eq!(back.cr0, n.cr0);
        assert_eq!(back.efer, n.efer);
    }

    #[test]
    fn registers_round_trip() {
        let r = Registers {
            rip: 0x100000,
            rsi: 0x7000,
            rflags: 2,
            r15: 15,
            ..Default::default()
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
    }
}

//! CPUID as the guest sees it: the host's supported set with the adjustments every microVM
//! makes (topology, APIC id, hypervisor bit and leaf, no PMU).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bit 31: running under a hypervisor (Linux then reads leaf 0x4000_0000).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0": Linux enables kvm-clock and other paravirt features from it, which
/// avoids slow TSC/PIT calibration at boot.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 6 EAX bit 2: the LAPIC timer keeps running in deep C-states (always running).
const EAX_ARAT: u32 = 1 << 2;

/// Adds the features KVM emulates but leaves out of `KVM_GET_SUPPORTED_CPUID`.
///
/// The TSC-deadline timer is reported through `KVM_CAP_TSC_DEADLINE_TIMER` instead (as
/// Firecracker and QEMU do, set it when the capability is there); ARAT holds for KVM's LAPIC
/// timer. With both, plus kvm-clock's known TSC frequency, Linux needs neither PIT nor LAPIC
/// timer calibration — faster boot, and a boot at all without a PIT (split irqchip).
pub fn add_emulated_features(entries: &mut [kvm_cpuid_entry2], tsc_deadline: bool) {
    for e in entries.iter_mut() {
        match e.function {
            1 if tsc_deadline => e.ecx |= ECX_TSC_DEADLINE,
            6 => e.eax |= EAX_ARAT,
            _ => {}
        }
    }
}

/// Number of bits needed to hold ids `0..count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites `entries` for vCPU `id` of `count`: one package of `count` cores, one thread each.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], id: u32, count: u32) {
    let count = count.max(1);
    let core_bits = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in quadwords.
                e.ebx = (id << 24) | ((count & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] logical processors sharing this cache - 1 (one thread per core;
                // L3 is shared by the package).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            // Architectural performance monitoring: not virtualized for guests.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (`count`).
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x4000_0000 => {
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            0x8000_0008 => {
                // ECX[7:0] = cores per package - 1 (AMD), [15:12] APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | ((core_bits & 0xf) << 12) | ((count - 1) & 0xff);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = [entry(1, 0)];
        adjust(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        let mut e = [entry(1, 0)];
        e[0].edx = EDX_HTT;
        adjust(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_one_package() {
        let mut e = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        adjust(&mut e, 5, 6);
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx >> 8, e[0].edx), (0, 1, 1, 5));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx >> 8, e[1].edx), (3, 6, 2, 5));
        assert_eq!((e[2].ebx, e[2].ecx >> 8), (0, 0));
    }

    #[test]
    fn hypervisor_leaf_is_kvm_and_pmu_is_hidden() {
        let mut e = [entry(0x4000_0000, 0), entry(0xa, 0)];
        e[1].eax = 0x0704_0804;
        adjust(&mut e, 0, 1);
        let sig: Vec<u8> = [e[0].ebx, e[0].ecx, e[0].edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig[..9], b"KVMKVMKVM");
        assert_eq!(e[1].eax, 0);
    }

    #[test]
    fn emulated_timer_features_are_added() {
        let mut e = [entry(1, 0), entry(6, 0)];
        add_emulated_features(&mut e, true);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[1].eax & EAX_ARAT, 0);
        let mut e = [entry(1, 0)];
        add_emulated_features(&mut e, false);
        assert_eq!(e[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}

//! The x86_64 microVM platform: memory map, Linux boot protocol structures, MP table, page
//! tables and GDT.

pub mod gdt;
pub mod layout;
pub mod memmap;
pub mod mptable;
pub mod paging;
// The zero page and PVH start_info use linux-loader's `boot_params` / `hvm_start_info`, which
// it only provides when built for x86; the rest of this module is plain data and compiles (and
// tests) on any host.
#[cfg(target_arch = "x86_64")]
pub mod pvh;
#[cfg(target_arch = "x86_64")]
pub mod zero_page;

#[cfg(target_arch = "x86_64")]
use {
    crate::boot::{BootError, InitrdRange, KernelCmdline, KernelFormat, LoadedKernel},
    crate::hypervisor::arch::x86_64::bits::{
        CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED,
    },
    crate::hypervisor::arch::x86_64::{BootState, Registers, SpecialRegisters},
    crate::memory::GuestMemory,
    layout::{BOOT_STACK_POINTER, CMDLINE_START, ZERO_PAGE_START},
    vm_memory::{Bytes, GuestAddress},
};

/// Writes everything the kernel reads at entry — command line, zero page with e820 map (or PVH
/// start_info with its memory map), MP table for `vcpus` CPUs, GDT, empty IDT and identity
/// page tables — and returns the boot-CPU register state for the kernel's entry protocol.
///
/// - [`KernelFormat::Elf`] / [`KernelFormat::BzImage`]: 64-bit long mode with the first GiB
///   identity mapped (CR0 = PE|PG|ET, CR4 = PAE, EFER = LME|LMA, CR3 = PML4), flat 64-bit
///   code and data segments, RIP = entry, RSI = zero page, RSP = RBP = boot stack.
/// - [`KernelFormat::ElfPvh`]: 32-bit protected mode without paging as the PVH ABI requires
///   (CR0 = PE|ET, CR4 = EFER = 0), flat 32-bit segments, RIP = PVH entry, RBX = start_info.
///
/// RFLAGS is 2 (interrupts off) in both. Fields left 0 — APIC base, CR2, CR8, LDT, the
/// other general registers — mean "keep the vCPU's reset value" to the backend; in
/// particular the backend keeps the APIC base MSR the vCPU was created with. Only the boot
/// CPU is set up: application processors start at reset state and are woken by the kernel
/// with INIT/SIPI.
///
/// # Errors
/// [`BootError::Cmdline`] for an over-long command line, [`BootError::TooManyVcpus`],
/// [`BootError::GuestMemory`] if guest memory does not cover the fixed boot areas.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::configure_system;
/// use smolvm::boot::{KernelCmdline, KernelFormat, LoadedKernel};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let kernel = LoadedKernel {
///     format: KernelFormat::Elf,
///     entry: 0x100_0000,
///     end: 0x200_0000,
///     setup_header: vec![],
/// };
/// let state = configure_system(&mem, &kernel, &KernelCmdline::new(), None, 2).unwrap();
/// assert_eq!(state.regs.rip, 0x100_0000);
/// assert_eq!(state.regs.rsi, smolvm::arch::x86_64::layout::ZERO_PAGE_START);
/// ```
#[cfg(target_arch = "x86_64")]
pub fn configure_system(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &KernelCmdline,
    initrd: Option<InitrdRange>,
    vcpus: u32,
) -> Result<BootState, BootError> {
    let cmdline = cmdline.to_cstring()?;
    let cmdline = cmdline.as_bytes_with_nul();
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::GuestMemory {
            what: "kernel command line",
            addr: CMDLINE_START,
        })?;
    if let Some(i) = initrd {
        // The initrd must be real RAM below the gap: the boot fields are 32-bit.
        let in_low_ram = i.addr.checked_add(i.size).is_some_and(|end| {
            end <= crate::boot::low_ram_end(mem) && i.addr >= layout::HIMEM_START
        });
        if !in_low_ram {
            return Err(BootError::GuestMemory {
                what: "initrd (outside RAM below the MMIO gap)",
                addr: i.addr,
            });
        }
    }
    mptable::setup_mptable(mem, vcpus)?;
    let map = memmap::memory_map(mem);

    match kernel.format {
        KernelFormat::Elf | KernelFormat::BzImage => {
            let params = zero_page::build(kernel, cmdline.len(), initrd, &map)?;
            zero_page::write(mem, &params)?;
            let cr3 = paging::setup_identity_map(mem)?;
            let (gdt, idt) = gdt::write_gdt(mem, &gdt::GDT_64BIT)?;
            let code = gdt::segment_from_gdt(gdt::GDT_64BIT[1], 1);
            let data = gdt::segment_from_gdt(gdt::GDT_64BIT[2], 2);
            let tss = gdt::segment_from_gdt(gdt::GDT_64BIT[3], 3);
            Ok(BootState {
                regs: Registers {
                    rip: kernel.entry,
                    rsp: BOOT_STACK_POINTER,
                    rbp: BOOT_STACK_POINTER,
                    rsi: ZERO_PAGE_START,
                    rflags: RFLAGS_RESERVED,
                    ..Default::default()
                },
                sregs: SpecialRegisters {
                    cs: code,
                    ds: data,
                    es: data,
                    fs: data,
                    gs: data,
                    ss: data,
                    tr: tss,
                    gdt,
                    idt,
                    cr0: CR0_PE | CR0_PG | CR0_ET,
                    cr3,
                    cr4: CR4_PAE,
                    efer: EFER_LME | EFER_LMA,
                    ..Default::default()
                },
            })
        }
        KernelFormat::ElfPvh => {
            let start_info = pvh::write_start_info(mem, initrd, &map)?;
            let (gdt, idt) = gdt::write_gdt(mem, &gdt::GDT_32BIT)?;
            let code = gdt::segment_from_gdt(gdt::GDT_32BIT[1], 1);
            let data = gdt::segment_from_gdt(gdt::GDT_32BIT[2], 2);
            let tss = gdt::segment_from_gdt(gdt::GDT_32BIT[3], 3);
            Ok(BootState {
                regs: Registers {
                    rip: kernel.entry,
                    rbx: start_info,
                    rflags: RFLAGS_RESERVED,
                    ..Default::default()
                },
                sregs: SpecialRegisters {
                    cs: code,
                    ds: data,
                    es: data,
                    fs: data,
                    gs: data,
                    ss: data,
                    tr: tss,
                    gdt,
                    idt,
                    cr0: CR0_PE | CR0_ET,
                    ..Default::default()
                },
            })
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::hypervisor::arch::x86_64::Segment;
    use layout::*;

    fn mem(size: usize) -> GuestMemory {
        crate::memory::create(&[(GuestAddress(0), size)]).unwrap()
    }

    fn kernel(format: KernelFormat) -> LoadedKernel {
        LoadedKernel {
            format,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: Vec::new(),
        }
    }

    #[test]
    fn long_mode_state() {
        let m = mem(128 << 20);
        let initrd = InitrdRange {
            addr: 0x700_0000,
            size: 0x1000,
        };
        let cmd = KernelCmdline::new();
        let s = configure_system(&m, &kernel(KernelFormat::Elf), &cmd, Some(initrd), 2).unwrap();
        assert_eq!(s.regs.rip, 0x100_0000);
        assert_eq!(
            (s.regs.rsp, s.regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!((s.regs.rsi, s.regs.rflags), (ZERO_PAGE_START, 2));
        assert_eq!(s.sregs.cr0, 0x8000_0011);
        assert_eq!(
            (s.sregs.cr3, s.sregs.cr4, s.sregs.efer),
            (PML4_START, 0x20, 0x500)
        );
        assert!(s.sregs.cs.l && !s.sregs.cs.db && s.sregs.cs.selector == 0x08);
        assert_eq!(s.sregs.ss.selector, 0x10);
        assert_eq!((s.sregs.tr.selector, s.sregs.tr.type_), (0x18, 0xb));
        assert_eq!((s.sregs.gdt.base, s.sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!(s.sregs.idt.base, BOOT_IDT_START);
        assert_eq!(s.sregs.apic_base, 0);

        let mut line = vec![0u8; cmd.to_string().len() + 1];
        m.read_slice(&mut line, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(line, cmd.to_cstring().unwrap().as_bytes_with_nul());
        let zp: linux_loader::loader::bootparam::boot_params =
            m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ zp.hdr.cmdline_size } as usize, line.len());
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let mut mp = [0u8; 4];
        m.read_slice(&mut mp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn pvh_state() {
        let m = mem(64 << 20);
        let s = configure_system(
            &m,
            &kernel(KernelFormat::ElfPvh),
            &KernelCmdline::new(),
            None,
            1,
        )
        .unwrap();
        assert_eq!(
            (s.regs.rip, s.regs.rbx, s.regs.rflags),
            (0x100_0000, PVH_INFO_START, 2)
        );
        assert_eq!(s.regs.rsi, 0);
        assert_eq!(
            (s.sregs.cr0, s.sregs.cr3, s.sregs.cr4, s.sregs.efer),
            (0x11, 0, 0, 0)
        );
        let flat32 = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            granularity: true,
            available: false,
            unusable: false,
        };
        assert_eq!(s.sregs.cs, flat32);
        assert_eq!(
            (s.sregs.ds.type_, s.sregs.ds.db, s.sregs.ds.limit),
            (3, true, 0xffff_ffff)
        );
        assert_eq!(s.sregs.es, s.sregs.ss);
        assert_eq!(
            (s.sregs.tr.type_, s.sregs.tr.limit, s.sregs.tr.s),
            (0xb, 0x67, false)
        );
        let magic: u32 = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, 0x336e_c578);
    }

    #[test]
    fn errors_are_typed() {
        let m = mem(64 << 20);
        let k = kernel(KernelFormat::Elf);
        let long = KernelCmdline::parse(&"x".repeat(CMDLINE_MAX_SIZE));
        assert!(matches!(
            configure_system(&m, &k, &long, None, 1),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            configure_system(&m, &k, &KernelCmdline::new(), None, 1000),
            Err(BootError::TooManyVcpus(1000))
        ));
        let bad = InitrdRange {
            addr: 63 << 20,
            size: 2 << 20,
        };
        assert!(matches!(
            configure_system(&m, &k, &KernelCmdline::new(), Some(bad), 1),
            Err(BootError::GuestMemory { .. })
        ));
        let tiny = mem(0x8000);
        assert!(matches!(
            configure_system(&tiny, &k, &KernelCmdline::new(), None, 1),
            Err(BootError::GuestMemory { .. })
        ));
    }
}

//! x86_64 register state in backend-neutral form.

/// General purpose registers, instruction pointer and flags.
///
/// # Example
/// ```
/// use smolvm::hypervisor::arch::x86_64::{bits, Registers};
/// let regs = Registers {
///     rip: 0x100_0000,
///     rsi: 0x7000,
///     rflags: bits::RFLAGS_RESERVED,
///     ..Default::default()
/// };
/// assert_eq!(regs.rflags & bits::RFLAGS_IF, 0, "interrupts off");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::gdt::{gdt_entry_from_segment, segment_from_gdt, GDT_64BIT};
/// let cs = segment_from_gdt(GDT_64BIT[1], 1);
/// assert!(cs.present && cs.l && !cs.db, "64-bit code segment");
/// assert_eq!(gdt_entry_from_segment(&cs), GDT_64BIT[1]);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: bool,
    /// Descriptor type: true for code/data, false for system segments.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    pub granularity: bool,
    pub available: bool,
    pub unusable: bool,
}

/// A descriptor-table register (GDTR, IDTR).
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::{gdt, layout};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let (gdtr, _idtr) = gdt::write_gdt(&mem, &gdt::GDT_64BIT).unwrap();
/// assert_eq!(gdtr.base, layout::BOOT_GDT_START);
/// assert_eq!(usize::from(gdtr.limit) + 1, gdt::GDT_64BIT.len() * 8);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes minus one.
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::gdt::{segment_from_gdt, GDT_64BIT};
/// use smolvm::hypervisor::arch::x86_64::{bits, SpecialRegisters};
/// let long_mode = |s: &SpecialRegisters| s.efer & bits::EFER_LMA != 0 && s.cs.l;
/// let mut sregs = SpecialRegisters::default();
/// assert!(!long_mode(&sregs));
/// sregs.efer = bits::EFER_LME | bits::EFER_LMA;
/// sregs.cs = segment_from_gdt(GDT_64BIT[1], 1);
/// assert!(long_mode(&sregs));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The registers a vCPU starts from.
///
/// Only the fields a boot protocol defines are applied: segment/control registers are
/// written over the vCPU's reset state and everything else keeps its reset value.
///
/// # Example
/// ```
/// use smolvm::arch::x86_64::configure_system;
/// use smolvm::boot::{KernelCmdline, KernelFormat, LoadedKernel};
/// use smolvm::hypervisor::arch::x86_64::bits;
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let kernel = LoadedKernel {
///     format: KernelFormat::ElfPvh,
///     entry: 0x100_0000,
///     end: 0x200_0000,
///     setup_header: vec![],
/// };
/// let state = configure_system(&mem, &kernel, &KernelCmdline::new(), None, 1).unwrap();
/// assert_eq!(state.regs.rip, kernel.entry);
/// assert_eq!(state.sregs.cr0 & bits::CR0_PG, 0, "PVH enters with paging off");
/// // A backend applies it with `Vcpu::set_boot_state(&state)`.
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootState {
    /// General purpose registers (entry point in `rip`, boot parameters in `rsi`/`rbx`).
    pub regs: Registers,
    /// Segments (from the boot GDT), GDTR/IDTR, CR0/CR3/CR4 and EFER.
    pub sregs: SpecialRegisters,
}

/// Control register and flag bits the boot code and backends use.
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.ET: extension type (always 1 on modern CPUs).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE: physical address extension (required for long mode).
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1 is reserved and always set.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
    /// RFLAGS.IF: maskable interrupts enabled.
    pub const RFLAGS_IF: u64 = 1 << 9;
}

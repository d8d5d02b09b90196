/*
 * smp: count the enabled processors in the MP table (N), start the APs with
 * INIT-SIPI-SIPI (broadcast, all excluding self) into a real-mode trampoline
 * copied to TRAMP_BASE, which goes real -> protected -> long mode. Every CPU
 * (BSP first) writes its APIC id (CPUID.1 EBX[31:24]) to TEST_PORT and
 * atomically increments cpus_up. The BSP waits (bounded) for cpus_up >= N and
 * prints "all N cpus up\n" (or "only K of N cpus up\n" / "no mp table\n"), then resets.
 */
#include "common.h"
#define TRAMP_BASE  0x10000             /* 4 KiB aligned, below 1 MiB, clear of boot data */
#define MAX_APS     256
#define AP_STACK    512
#define WAIT_TSC    3000000000          /* bound on the BSP's wait for the APs: 3e9 TSC ticks (~1-3 s) */
#define DELAY_LOOPS 1000                /* INIT -> SIPI spacing (KVM needs none) */

        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        call    map_apic
        call    count_mp_cpus
        testl   %eax, %eax
        jnz     1f
        leaq    msg_nomp(%rip), %rsi
        call    puts
        jmp     reset
1:      movl    %eax, %r12d             /* N */
        movl    $LAPIC_BASE, %ebx
        movl    LAPIC_SVR(%rbx), %eax
        orl     $0x1ff, %eax
        movl    %eax, LAPIC_SVR(%rbx)
        cld
        leaq    tramp_start(%rip), %rsi
        movl    $TRAMP_BASE, %edi
        movl    $(tramp_end - tramp_start), %ecx
        rep movsb
        movq    %cr3, %rax
        movl    %eax, (TRAMP_BASE + tramp_cr3 - tramp_start)
        call    report_cpu              /* the BSP checks in first */
        cmpl    $1, %r12d
        jbe     wait_aps
        movl    $0, LAPIC_ICR_HI(%rbx)
        movl    $0x000c4500, LAPIC_ICR_LO(%rbx)     /* INIT, assert, all excluding self */
        call    delay
        movl    $(0x000c4600 | (TRAMP_BASE >> 12)), LAPIC_ICR_LO(%rbx)  /* SIPI */
        call    delay
        movl    $(0x000c4600 | (TRAMP_BASE >> 12)), LAPIC_ICR_LO(%rbx)  /* SIPI again */
wait_aps:
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        movq    %rdx, %r13              /* start */
        movl    $WAIT_TSC, %r14d
1:      cmpl    %r12d, cpus_up(%rip)
        jae     2f
        pause
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        subq    %r13, %rdx
        cmpq    %r14, %rdx
        jb      1b
        leaq    msg_only(%rip), %rsi
        call    puts
        movl    cpus_up(%rip), %edi
        call    put_dec
        leaq    msg_of(%rip), %rsi
        call    puts
        movl    %r12d, %edi
        call    put_dec
        leaq    msg_cpus_up(%rip), %rsi
        call    puts
        jmp     reset
2:      leaq    msg_all(%rip), %rsi
        call    puts
        movl    %r12d, %edi
        call    put_dec
        leaq    msg_cpus_up(%rip), %rsi
        call    puts
        jmp     reset

delay:
        pushq   %rcx
        movl    $DELAY_LOOPS, %ecx
1:      pause
        decl    %ecx
        jnz     1b
        popq    %rcx
        ret

/* %eax = number of enabled processor entries in the MP table, 0 if none found. */
count_mp_cpus:
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        movl    $0x9fc00, %esi          /* where the VMM puts it (last KiB of base memory) */
1:      cmpl    $0x5f504d5f, (%rsi)     /* "_MP_" */
        je      3f
        addl    $16, %esi
        cmpl    $0xa0000, %esi
        jb      1b
        movl    $0xf0000, %esi          /* the BIOS area, as the spec allows */
2:      cmpl    $0x5f504d5f, (%rsi)
        je      3f
        addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      2b
        jmp     8f
3:      movl    4(%rsi), %esi           /* physical address of the configuration table */
        testl   %esi, %esi
        jz      8f
        cmpl    $0x504d4350, (%rsi)     /* "PCMP" */
        jne     8f
        movzwl  4(%rsi), %r8d           /* base table length bounds the walk */
        addq    %rsi, %r8
        movzwl  34(%rsi), %ecx          /* entry count */
        leaq    44(%rsi), %rdi
        xorl    %eax, %eax
4:      testl   %ecx, %ecx
        jz      9f
        cmpq    %r8, %rdi
        jae     9f
        movzbl  (%rdi), %edx
        testl   %edx, %edx
        jnz     5f
        testb   $1, 3(%rdi)             /* processor entry: CPU flags bit 0 = enabled */
        jz      6f
        incl    %eax
6:      addq    $20, %rdi
        jmp     7f
5:      addq    $8, %rdi                /* bus, IOAPIC, interrupt entries are 8 bytes */
7:      decl    %ecx
        jmp     4b
8:      xorl    %eax, %eax
9:      popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        ret

/* Write this CPU's APIC id to TEST_PORT and count it in cpus_up. */
report_cpu:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx
        movl    %ebx, %eax
        call    test_out
        lock incl cpus_up(%rip)
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        ret

/* APs arrive here in long mode from the trampoline. */
ap_entry64:
        movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $1, %eax
        lock xaddl %eax, ap_next(%rip)
        andl    $(MAX_APS - 1), %eax
        incl    %eax
        imull   $AP_STACK, %eax
        leaq    ap_stacks(%rip), %rsp
        addq    %rax, %rsp
        lidt    idt_desc(%rip)
        call    report_cpu
1:      cli
        hlt
        jmp     1b

/*
 * AP trampoline, copied to TRAMP_BASE; entered in real mode at CS:IP = (TRAMP_BASE>>4):0.
 * Only position-independent references (label - tramp_start) are used.
 */
        .balign 16
        .code16
tramp_start:
        cli
        movw    %cs, %ax
        movw    %ax, %ds
        lgdtl   (tramp_gdt_desc - tramp_start)
        movl    %cr0, %eax
        orl     $1, %eax                /* PE */
        movl    %eax, %cr0
        ljmpl   $SEL_CODE32, $(TRAMP_BASE + tramp32 - tramp_start)
        .code32
tramp32:
        movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %cr4, %eax
        orl     $0x20, %eax             /* PAE */
        movl    %eax, %cr4
        movl    (TRAMP_BASE + tramp_cr3 - tramp_start), %eax
        movl    %eax, %cr3              /* the BSP's page tables */
        movl    $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        orl     $0x100, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000000, %eax       /* PG -> long mode active */
        movl    %eax, %cr0
        ljmp    $SEL_CODE64, $ap_entry64
        .balign 8
        .word   0, 0, 0
tramp_gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
tramp_cr3:
        .long   0
tramp_end:
        .code64

        .section .rodata
msg_nomp:    .asciz "no mp table\n"
msg_only:    .asciz "only "
msg_of:      .asciz " of "
msg_all:     .asciz "all "
msg_cpus_up: .asciz " cpus up\n"

        .data
        .balign 4
cpus_up:    .long 0
ap_next:    .long 0

        .bss
        .balign 16
ap_stacks:  .skip MAX_APS * AP_STACK

#include "common64.S"

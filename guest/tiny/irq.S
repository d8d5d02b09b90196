/*
 * irq: route GSI 10 through the IOAPIC to vector 0x40 (fixed, edge, active high,
 * physical destination APIC 0), enable the LAPIC, print "irq ready\n" and wait in
 * sti; hlt. The vector 0x40 handler writes 0x40 to TEST_PORT and EOIs; once it
 * ran, print "irq ok\n" and reset.
 */
#include "common.h"
#define IRQ_VECTOR 0x40
#define IRQ_GSI    10
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        call    map_apic
        movb    $0xff, %al              /* mask both 8259s: only the IOAPIC path */
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $IRQ_VECTOR, %edi
        leaq    irq_handler(%rip), %rsi
        call    set_gate
        movl    $LAPIC_BASE, %ebx
        movl    LAPIC_SVR(%rbx), %eax
        orl     $0x1ff, %eax            /* APIC software enable, spurious vector 0xff */
        movl    %eax, LAPIC_SVR(%rbx)
        movl    $IOAPIC_BASE, %ebx
        movl    $(0x10 + 2 * IRQ_GSI + 1), (%rbx)   /* IOREGSEL: redirection high */
        movl    $0, 0x10(%rbx)                      /* IOWIN: destination APIC 0 */
        movl    $(0x10 + 2 * IRQ_GSI), (%rbx)       /* redirection low */
        movl    $IRQ_VECTOR, 0x10(%rbx)             /* fixed, physical, edge, high, unmasked */
        leaq    msg_ready(%rip), %rsi
        call    puts
1:      cli
        cmpl    $0, irq_count(%rip)
        jne     2f
        sti
        hlt                             /* sti shadow: no lost wake-up */
        jmp     1b
2:      leaq    msg_ok(%rip), %rsi
        call    puts
        jmp     reset

irq_handler:
        pushq   %rax
        pushq   %rbx
        movl    $IRQ_VECTOR, %eax
        call    test_out
        lock incl irq_count(%rip)
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_EOI(%rbx)
        popq    %rbx
        popq    %rax
        iretq

        .section .rodata
msg_ready:  .asciz "irq ready\n"
msg_ok:     .asciz "irq ok\n"

        .data
        .balign 4
irq_count:  .long 0

#include "common64.S"

/*
 * hello_pvh: a PVH guest. The Xen ELF note (type 18, XEN_ELFNOTE_PHYS32_ENTRY)
 * names pvh_start, entered in 32-bit protected mode, paging off, EBX = start_info.
 * Loads its own GDT + 32-bit IDT, prints "Hello from PVH!\n", then
 * "pvh magic ok\n" if [EBX] == 0x336ec578 else "pvh magic bad\n", then resets.
 * The 64-bit ELF entry (_start) is a trap for a VMM that ignored the note:
 * it prints "hello_pvh: entered in 64-bit mode, not through PVH\n" and resets.
 */
#include "common.h"
#define PVH_MAGIC 0x336ec578

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .long   pvh_start
        .balign 4

        .section .text.start, "ax"
        .code32
        .globl  pvh_start
pvh_start:
        cli
        movl    %ebx, %ebp              /* hvm_start_info */
        movl    $stack_top, %esp
        lgdt    gdt_desc                /* limit + low 32 bits of the base */
        ljmp    $SEL_CODE32, $1f
1:      movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $idt, %edi              /* 256 8-byte gates in the shared IDT area */
        movl    $exc_stubs32, %esi
        movl    $256, %ecx
2:      movl    %esi, %eax
        movw    %ax, (%edi)
        movw    $SEL_CODE32, 2(%edi)
        movw    $0x8e00, 4(%edi)        /* present, DPL 0, 32-bit interrupt gate */
        shrl    $16, %eax
        movw    %ax, 6(%edi)
        addl    $8, %edi
        addl    $16, %esi
        decl    %ecx
        jnz     2b
        lidt    idt32_desc
        movl    $msg_hello, %esi
        call    puts32
        movl    $msg_ok, %esi
        cmpl    $PVH_MAGIC, (%ebp)
        je      3f
        movl    $msg_bad, %esi
3:      call    puts32
reset32:
        movb    $0xfe, %al
        outb    %al, $I8042_CMD
4:      cli
        hlt
        jmp     4b

putc32:
        pushl   %eax
        pushl   %ecx
        pushl   %edx
        movb    %al, %ah
        movl    $100000, %ecx
        movw    $COM1_LSR, %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jnz     2f
        pause
        decl    %ecx
        jnz     1b
2:      movb    %ah, %al
        movw    $COM1, %dx
        outb    %al, %dx
        popl    %edx
        popl    %ecx
        popl    %eax
        ret

puts32:
        pushl   %eax
        pushl   %esi
1:      movb    (%esi), %al
        testb   %al, %al
        jz      2f
        call    putc32
        incl    %esi
        jmp     1b
2:      popl    %esi
        popl    %eax
        ret

        .balign 16
exc_stubs32:
        .set    vec, 0
        .rept   256
        .balign 16
        movl    $vec, %edi
        jmp     exc_common32
        .set    vec, vec + 1
        .endr

exc_common32:
        cli
        movl    $msg_exception, %esi
        call    puts32
        subl    $16, %esp               /* decimal vector */
        leal    15(%esp), %esi
        movb    $0, (%esi)
        movl    %edi, %eax
        movl    $10, %ecx
1:      xorl    %edx, %edx
        divl    %ecx
        addb    $'0', %dl
        decl    %esi
        movb    %dl, (%esi)
        testl   %eax, %eax
        jnz     1b
        call    puts32
        movb    $'\n', %al
        call    putc32
        jmp     reset32

        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        leaq    msg_not_pvh(%rip), %rsi
        call    puts
        jmp     reset

        .section .rodata
msg_hello:   .asciz "Hello from PVH!\n"
msg_ok:      .asciz "pvh magic ok\n"
msg_bad:     .asciz "pvh magic bad\n"
msg_not_pvh: .asciz "hello_pvh: entered in 64-bit mode, not through PVH\n"
        .balign 8
        .word   0, 0, 0
idt32_desc:
        .word   256 * 8 - 1
        .long   idt

#include "common64.S"

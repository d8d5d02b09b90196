/* triple_fault: print, load an empty IDT, ud2 -> #UD -> #DF -> triple fault (shutdown). */
#include "common.h"
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64                 /* a normal IDT until we mean to fault */
        leaq    msg(%rip), %rsi
        call    puts
        lidt    null_idt(%rip)
        ud2
1:      cli                             /* not reached */
        hlt
        jmp     1b

        .section .rodata
msg:    .asciz  "faulting\n"
        .balign 8
        .word   0, 0, 0
null_idt:
        .word   0
        .quad   0

#include "common64.S"

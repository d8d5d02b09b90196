/* halt: print, then cli; hlt forever (never exits by itself). */
#include "common.h"
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        leaq    msg(%rip), %rsi
        call    puts
1:      cli
        hlt
        jmp     1b

        .section .rodata
msg:    .asciz  "halting\n"

#include "common64.S"

/*
 * spin: print, then busy-loop forever with interrupts off; after every 100000
 * iterations write an increasing counter (1, 2, 3, ...) to TEST_PORT.
 */
#include "common.h"
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        leaq    msg(%rip), %rsi
        call    puts
        cli
        xorl    %ebx, %ebx
1:      movl    $100000, %ecx
2:      decl    %ecx
        jnz     2b
        incl    %ebx
        movl    %ebx, %eax
        call    test_out
        jmp     1b

        .section .rodata
msg:    .asciz  "spinning\n"

#include "common64.S"

/* hello: print a greeting, then reset through the i8042. See README.md. */
#include "common.h"
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        leaq    msg(%rip), %rsi
        call    puts
        jmp     reset

        .section .rodata
msg:    .asciz  "Hello from smolvm!\n"

#include "common64.S"

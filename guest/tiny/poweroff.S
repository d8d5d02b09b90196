/* poweroff: print, then ACPI S5 via a 16-bit write of SLP_EN to PM1a control (0x604). */
#include "common.h"
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        leaq    msg(%rip), %rsi
        call    puts
        movw    $PM1A_CNT, %dx
        movw    $SLP_EN, %ax
        outw    %ax, %dx
        leaq    msg_failed(%rip), %rsi  /* only reached if the VMM ignored it */
        call    puts
1:      cli
        hlt
        jmp     1b

        .section .rodata
msg:        .asciz "powering off\n"
msg_failed: .asciz "poweroff failed\n"

#include "common64.S"

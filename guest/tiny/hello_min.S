/* hello_min: the smallest "print and reset" guest, for measuring VMM overhead.
 *
 * No IDT, no stack, no LSR polling: every guest instruction here is emulated on kvm_pvm
 * hosts (~2.7M instructions/s), so the benchmarks of VMM start-up and teardown use this
 * guest to keep guest work out of the measurement. The 16550 model accepts a byte at any
 * time, so skipping the LSR poll loses nothing. See README.md.
 */
        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    msg(%rip), %rsi
        movl    $(msg_end - msg), %ecx
        movw    $0x3f8, %dx
        rep outsb
        movb    $0xfe, %al
        outb    %al, $0x64
1:      cli
        hlt
        jmp     1b

        .section .rodata
msg:    .ascii  "Hello from smolvm!\n"
msg_end:

/*
 * Runtime shared by the 64-bit tiny guests; #included at the end of each one.
 * Integer-only CPL0 code (the kvm_pvm host emulates CPL0; see README.md).
 *
 *   setup64      load our own GDT, reload segments, build + load a 256-entry IDT
 *                whose handlers print "exception <vector>\n" and reset.
 *   set_gate     %edi = vector, %rsi = handler: replace one IDT gate.
 *   map_apic     the boot identity map covers only the first 1 GiB: if the PDPT entry
 *                for 3-4 GiB is absent, add a page directory mapping the virtio-mmio
 *                windows (0xd0000000-0xd01fffff), the IOAPIC and the LAPIC
 *                (0xfec00000-0xfeffffff), 2 MiB pages, uncached. Needs the PML4 at CR3
 *                with PML4[0] -> PDPT (as the VMM builds it).
 *   puts         %rsi = NUL-terminated string -> COM1.
 *   putc         %al -> COM1 (bounded THR-empty poll).
 *   put_dec      %edi = unsigned value -> COM1 in decimal.
 *   test_out     %eax -> 32-bit out to TEST_PORT.
 *   reset        i8042 reset (0xfe -> port 0x64); if that returns: cli; hlt forever.
 * All helpers preserve every register except the documented inputs' flags.
 */
        .code64
        .text

setup64:
        lgdt    gdt_desc(%rip)
        popq    %rdi                    /* return address */
        pushq   $SEL_CODE64
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq                           /* reload CS from our GDT */
1:      movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        pushq   %rdi
        leaq    idt(%rip), %rdi
        leaq    exc_stubs(%rip), %rsi
        movl    $256, %ecx
2:      movq    %rsi, %rax
        movw    %ax, (%rdi)             /* offset 15:0 */
        movw    $SEL_CODE64, 2(%rdi)
        movw    $0x8e00, 4(%rdi)        /* present, DPL 0, 64-bit interrupt gate */
        shrq    $16, %rax
        movw    %ax, 6(%rdi)            /* offset 31:16 */
        shrq    $16, %rax
        movl    %eax, 8(%rdi)           /* offset 63:32 */
        movl    $0, 12(%rdi)
        addq    $16, %rdi
        addq    $16, %rsi
        decl    %ecx
        jnz     2b
        lidt    idt_desc(%rip)
        ret

set_gate:
        pushq   %rax
        pushq   %rdi
        andl    $0xff, %edi
        shll    $4, %edi
        addq    $idt, %rdi
        movq    %rsi, %rax
        movw    %ax, (%rdi)
        movw    $SEL_CODE64, 2(%rdi)
        movw    $0x8e00, 4(%rdi)
        shrq    $16, %rax
        movw    %ax, 6(%rdi)
        shrq    $16, %rax
        movl    %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        popq    %rdi
        popq    %rax
        ret

map_apic:
        pushq   %rax
        pushq   %rcx
        pushq   %rdi
        pushq   %rdx
        movq    %cr3, %rdx
        andq    $-4096, %rdx
        movq    (%rdx), %rdx            /* PML4[0] */
        movabsq $0x000ffffffffff000, %rax
        andq    %rax, %rdx              /* PDPT */
        testb   $1, 24(%rdx)            /* PDPT[3] (3-4 GiB) already present? */
        jnz     1f
        leaq    apic_pd(%rip), %rdi
        xorl    %eax, %eax
        movl    $512, %ecx
        cld
        rep stosq
        leaq    apic_pd(%rip), %rdi
        movl    $(0xd0000000 | 0x9b), %eax      /* P RW PWT PCD PS: virtio-mmio slots */
        movq    %rax, 128 * 8(%rdi)
        movl    $(0xfec00000 | 0x9b), %eax      /* IOAPIC */
        movq    %rax, 502 * 8(%rdi)
        movl    $(0xfee00000 | 0x9b), %eax      /* LAPIC */
        movq    %rax, 503 * 8(%rdi)
        movq    %rdi, %rax
        orq     $3, %rax
        movq    %rax, 24(%rdx)
        movq    %cr3, %rax
        movq    %rax, %cr3
1:      popq    %rdx
        popq    %rdi
        popq    %rcx
        popq    %rax
        ret

putc:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        movb    %al, %ah
        movl    $100000, %ecx           /* bounded: a broken LSR must not hang us */
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
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

puts:
        pushq   %rax
        pushq   %rsi
1:      movb    (%rsi), %al
        testb   %al, %al
        jz      2f
        call    putc
        incq    %rsi
        jmp     1b
2:      popq    %rsi
        popq    %rax
        ret

put_dec:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        subq    $16, %rsp
        leaq    15(%rsp), %rsi
        movb    $0, (%rsi)
        movl    %edi, %eax
        movl    $10, %ecx
1:      xorl    %edx, %edx
        divl    %ecx
        addb    $'0', %dl
        decq    %rsi
        movb    %dl, (%rsi)
        testl   %eax, %eax
        jnz     1b
        call    puts
        addq    $16, %rsp
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

test_out:
        pushq   %rdx
        movw    $TEST_PORT, %dx
        outl    %eax, %dx
        popq    %rdx
        ret

reset:
        movb    $0xfe, %al
        outb    %al, $I8042_CMD
1:      cli
        hlt
        jmp     1b

/* One 16-byte stub per vector: %edi = vector, then the common handler. */
        .balign 16
exc_stubs:
        .set    vec, 0
        .rept   256
        .balign 16
        movl    $vec, %edi
        jmp     exc_common
        .set    vec, vec + 1
        .endr

exc_common:
        cli
        leaq    msg_exception(%rip), %rsi
        call    puts
        call    put_dec
        movb    $'\n', %al
        call    putc
        jmp     reset

        .section .rodata
msg_exception:  .asciz "exception "

        .data
        .balign 16
gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf93000000ffff      /* 0x10: flat data */
        .quad   0x00cf9b000000ffff      /* 0x18: flat 32-bit code (AP trampoline) */
gdt_end:
        .balign 8
        .word   0, 0, 0
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .balign 8
        .word   0, 0, 0
idt_desc:
        .word   256 * 16 - 1
        .quad   idt

        .bss
        .balign 4096
apic_pd: .skip  4096
idt:    .skip   256 * 16
        .balign 16
stack:  .skip   4096
stack_top:

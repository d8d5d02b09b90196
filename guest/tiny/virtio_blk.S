/*
 * virtio_blk: a minimal virtio-blk driver for the first virtio-mmio slot (0xd0000000,
 * GSI 5). Writes 512 bytes of a known pattern to sector 1, reads sector 1 back, and
 * reports each step (see README.md, "virtio_blk in detail"):
 *
 *   TEST_PORT  0x100 | write status, 0x200 | read status, 0x300 | (0 equal, 1 differ)
 *   serial     "virtio-blk ok\n" or "virtio-blk failed\n" (or one of the
 *              "virtio-blk: ...\n" diagnostics), then i8042 reset.
 *
 * Interrupts: IOAPIC pin 5 -> vector 0x41 (fixed, physical, edge, dest APIC 0); the
 * handler acks InterruptStatus and records it. A periodic LAPIC timer (vector 0x42,
 * ~10 ms) guarantees wake-ups from hlt, so waiting for the device is bounded even when
 * its interrupt never comes.
 */
#include "common.h"
#include "virtio_mmio.h"

#define VBLK_BASE       0xd0000000
#define VBLK_VECTOR     0x41
#define VBLK_GSI        5
#define MAX_WAKEUPS     500             /* per request: ~5 s of timer ticks */

/* virtio-mmio registers (version 2 layout) */

#define BLK_T_IN        0
#define BLK_T_OUT       1
#define SECTOR          1

/* Driver memory (identity-mapped guest RAM, zeroed by the guest). */
#define QSIZE           8
#define DESC            0x300000        /* descriptor table, 16 * QSIZE */
#define AVAIL           0x301000        /* flags, idx, ring[QSIZE] (u16) */
#define USED            0x302000        /* flags, idx, ring[QSIZE] {id u32, len u32} */
#define HDR             0x303000        /* request header: type u32, reserved u32, sector u64 */
#define WBUF            0x304000        /* 512 bytes written */
#define STATB           0x305000        /* status byte */
#define RBUF            0x306000        /* 512 bytes read back */
#define DRV_MEM_END     0x307000

/* request() error results (above any status byte) */
#define E_NO_IRQ        0x1000
#define E_BAD_USED      0x2000

        .section .text.start, "ax"
        .code64
        .globl  _start
_start:
        leaq    stack_top(%rip), %rsp
        call    setup64
        call    map_apic                /* also maps 0xd0000000 (virtio-mmio) uncached */
        movb    $0xff, %al              /* mask both 8259s: only the IOAPIC path */
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $VBLK_VECTOR, %edi
        leaq    vblk_irq(%rip), %rsi
        call    set_gate
        movl    $TIMER_VECTOR, %edi
        leaq    timer_irq(%rip), %rsi
        call    set_gate

        movl    $LAPIC_BASE, %ebx
        movl    LAPIC_SVR(%rbx), %eax
        orl     $0x1ff, %eax            /* APIC software enable, spurious vector 0xff */
        movl    %eax, LAPIC_SVR(%rbx)
        movl    $0xb, LAPIC_TMR_DIV(%rbx)                       /* divide by 1 */
        movl    $(TIMER_VECTOR | 0x20000), LAPIC_LVT_TIMER(%rbx) /* periodic, unmasked */
        movl    $TIMER_PERIOD, LAPIC_TMR_INIT(%rbx)

        movl    $IOAPIC_BASE, %ebx
        movl    $(0x10 + 2 * VBLK_GSI + 1), (%rbx)  /* IOREGSEL: redirection high */
        movl    $0, 0x10(%rbx)                      /* destination APIC 0 */
        movl    $(0x10 + 2 * VBLK_GSI), (%rbx)      /* redirection low */
        movl    $VBLK_VECTOR, 0x10(%rbx)            /* fixed, physical, edge, high, unmasked */

        /* Probe: unclaimed MMIO reads as all-ones, so no device fails the magic check. */
        movl    $VBLK_BASE, %ebx
        movl    R_MAGIC(%rbx), %eax
        cmpl    $VIRTIO_MAGIC, %eax
        jne     no_device
        movl    R_VERSION(%rbx), %eax
        cmpl    $2, %eax
        jne     no_device
        movl    R_DEVICE_ID(%rbx), %eax
        cmpl    $2, %eax
        jne     no_device

        /* Handshake (virtio 1.2, 3.1.1). */
        movl    $0, R_STATUS(%rbx)
        movl    $S_ACKNOWLEDGE, R_STATUS(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER), R_STATUS(%rbx)
        movl    $0, R_DEV_FEAT_SEL(%rbx)
        movl    R_DEV_FEAT(%rbx), %eax  /* bits 0-31: none wanted */
        movl    $1, R_DEV_FEAT_SEL(%rbx)
        movl    R_DEV_FEAT(%rbx), %eax  /* bits 32-63 */
        testl   $1, %eax                /* VIRTIO_F_VERSION_1 (bit 32) */
        jz      features_rejected
        movl    $0, R_DRV_FEAT_SEL(%rbx)
        movl    $0, R_DRV_FEAT(%rbx)
        movl    $1, R_DRV_FEAT_SEL(%rbx)
        movl    $1, R_DRV_FEAT(%rbx)    /* VIRTIO_F_VERSION_1 only */
        movl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), R_STATUS(%rbx)
        movl    R_STATUS(%rbx), %eax
        testl   $S_FEATURES_OK, %eax
        jz      features_rejected

        /* Queue 0 in zeroed guest RAM. */
        movl    $DESC, %edi
        xorl    %eax, %eax
        movl    $((DRV_MEM_END - DESC) / 8), %ecx
        cld
        rep stosq
        movl    $0, R_QUEUE_SEL(%rbx)
        movl    R_QUEUE_NUM_MAX(%rbx), %eax
        cmpl    $QSIZE, %eax
        jb      queue_too_small
        movl    $QSIZE, R_QUEUE_NUM(%rbx)
        movl    $DESC, R_DESC_LO(%rbx)
        movl    $0, R_DESC_HI(%rbx)
        movl    $AVAIL, R_AVAIL_LO(%rbx)
        movl    $0, R_AVAIL_HI(%rbx)
        movl    $USED, R_USED_LO(%rbx)
        movl    $0, R_USED_HI(%rbx)
        movl    $1, R_QUEUE_READY(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%rbx)
        movl    R_STATUS(%rbx), %eax
        cmpl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), %eax
        jne     driver_ok_rejected

        /* Request 1: OUT sector 1 <- pattern (byte i = (i * 7 + 3) & 0xff). */
        movl    $WBUF, %edi
        xorl    %ecx, %ecx
1:      leal    3(%rcx,%rcx,2), %eax    /* 3i + 3 */
        leal    (%rax,%rcx,4), %eax     /* 7i + 3 */
        movb    %al, (%rdi,%rcx)
        incl    %ecx
        cmpl    $512, %ecx
        jb      1b
        movl    $BLK_T_OUT, %edi
        movl    $WBUF, %esi
        movl    $DESC_F_NEXT, %edx      /* data: device-readable */
        movl    $1, %ecx                /* used length: the status byte */
        call    request
        movl    %eax, %r12d
        orl     $0x100, %eax
        call    test_out

        /* Request 2: IN sector 1 -> zeroed buffer. */
        movl    $RBUF, %edi
        xorl    %eax, %eax
        movl    $(512 / 8), %ecx
        rep stosq
        movl    $BLK_T_IN, %edi
        movl    $RBUF, %esi
        movl    $(DESC_F_NEXT | DESC_F_WRITE), %edx
        movl    $513, %ecx              /* data + status byte */
        call    request
        movl    %eax, %r13d
        orl     $0x200, %eax
        call    test_out

        /* Compare what came back with the pattern. */
        xorl    %r14d, %r14d
        movl    $RBUF, %edi
        movl    $WBUF, %esi
        xorl    %ecx, %ecx
2:      movb    (%rdi,%rcx), %al
        cmpb    (%rsi,%rcx), %al
        jne     3f
        incl    %ecx
        cmpl    $512, %ecx
        jb      2b
        jmp     4f
3:      movl    $1, %r14d
4:      movl    %r14d, %eax
        orl     $0x300, %eax
        call    test_out

        orl     %r13d, %r12d
        orl     %r14d, %r12d
        jnz     failed
        leaq    msg_ok(%rip), %rsi
        call    puts
        jmp     reset

/*
 * request: %edi = type, %esi = data buffer (512 bytes), %edx = data descriptor flags,
 * %ecx = expected used length. Builds the 3-descriptor chain (header readable, data,
 * status writable) at descriptors 0-2, publishes it, notifies queue 0 and waits for
 * the used-ring interrupt. Returns %eax = the status byte; E_NO_IRQ / E_BAD_USED do
 * not return (diagnostic + reset). Clobbers %eax, %ecx, %edx, %edi, %esi, %r8.
 */
request:
        movl    %ecx, %r8d
        movl    %edi, HDR
        movl    $0, HDR + 4
        movq    $SECTOR, HDR + 8
        movb    $0xff, STATB            /* the device must overwrite this */

        movq    $HDR, DESC
        movl    $16, DESC + 8
        movw    $DESC_F_NEXT, DESC + 12
        movw    $1, DESC + 14
        movq    %rsi, DESC + 16
        movl    $512, DESC + 24
        movw    %dx, DESC + 28
        movw    $2, DESC + 30
        movq    $STATB, DESC + 32
        movl    $1, DESC + 40
        movw    $DESC_F_WRITE, DESC + 44
        movw    $0, DESC + 46

        movzwl  avail_next(%rip), %eax
        movl    %eax, %ecx
        andl    $(QSIZE - 1), %ecx
        movw    $0, AVAIL + 4(,%rcx,2)  /* ring[idx % QSIZE] = head 0 */
        incl    %eax
        movw    %ax, avail_next(%rip)
        movl    $0, irq_status(%rip)
        mfence                          /* descriptors and ring entry before idx */
        movw    %ax, AVAIL + 2
        mfence
        movl    $0, R_QUEUE_NOTIFY(%rbx) /* queue 0 */

        movl    $MAX_WAKEUPS, %ecx
1:      cli
        testl   $1, irq_status(%rip)    /* INTERRUPT_USED_RING */
        jnz     2f
        decl    %ecx
        jz      no_interrupt
        sti
        hlt                             /* sti shadow: no lost wake-up */
        jmp     1b

2:      movzwl  USED + 2, %eax
        cmpw    avail_next(%rip), %ax
        jne     bad_used
        leal    -1(%rax), %ecx
        andl    $(QSIZE - 1), %ecx
        movl    USED + 4(,%rcx,8), %eax /* id */
        testl   %eax, %eax
        jnz     bad_used
        movl    USED + 8(,%rcx,8), %eax /* len */
        cmpl    %r8d, %eax
        jne     bad_used
        movzbl  STATB, %eax
        ret

no_device:
        leaq    msg_no_device(%rip), %rsi
        call    puts
        jmp     reset
features_rejected:
        leaq    msg_features(%rip), %rsi
        jmp     fail_device
queue_too_small:
        leaq    msg_queue(%rip), %rsi
        jmp     fail_device
driver_ok_rejected:
        leaq    msg_driver_ok(%rip), %rsi
        jmp     fail_device
no_interrupt:
        leaq    msg_no_irq(%rip), %rsi
        call    puts
        jmp     reset
bad_used:
        leaq    msg_bad_used(%rip), %rsi
fail_device:
        call    puts
        movl    $VBLK_BASE, %ebx
        movl    R_STATUS(%rbx), %eax
        orl     $S_FAILED, %eax
        movl    %eax, R_STATUS(%rbx)
failed:
        leaq    msg_failed(%rip), %rsi
        call    puts
        jmp     reset

vblk_irq:
        pushq   %rax
        pushq   %rbx
        movl    $VBLK_BASE, %ebx
        movl    R_INT_STATUS(%rbx), %eax
        movl    %eax, R_INT_ACK(%rbx)
        lock orl %eax, irq_status(%rip)
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_EOI(%rbx)
        popq    %rbx
        popq    %rax
        iretq

timer_irq:
        pushq   %rbx
        lock incl ticks(%rip)
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_EOI(%rbx)
        popq    %rbx
        iretq

        .section .rodata
msg_ok:         .asciz "virtio-blk ok\n"
msg_failed:     .asciz "virtio-blk failed\n"
msg_no_device:  .asciz "virtio-blk: no device\n"
msg_no_irq:     .asciz "virtio-blk: no interrupt\n"
msg_features:   .asciz "virtio-blk: features rejected\n"
msg_queue:      .asciz "virtio-blk: queue too small\n"
msg_driver_ok:  .asciz "virtio-blk: driver_ok rejected\n"
msg_bad_used:   .asciz "virtio-blk: bad used ring\n"

        .data
        .balign 4
irq_status:     .long 0                 /* InterruptStatus bits seen since the last request */
ticks:          .long 0                 /* LAPIC timer interrupts */
avail_next:     .word 0                 /* next avail.idx */

#include "common64.S"

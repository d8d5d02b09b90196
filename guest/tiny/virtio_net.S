/*
 * virtio_net: a minimal virtio-net driver for the first virtio-mmio slot (0xd0000000,
 * GSI 5) that echoes every frame it receives: destination MAC := the frame's source,
 * source MAC := the device's configured MAC, everything else byte-identical. See README.md,
 * "virtio_net in detail".
 *
 *   TEST_PORT  0x100 once the receive buffers are posted (send frames after this),
 *              0x200 | n after the n-th echo is queued (n mod 256)
 *   serial     "virtio-net ready\n", or one of the "virtio-net: ...\n" diagnostics and
 *              then i8042 reset.
 *
 * Features: VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only, so every buffer starts with the
 * 12-byte virtio_net_hdr_v1 and one receive buffer holds one whole frame (no MRG_RXBUF).
 * Runs until the VMM stops it.
 */
#include "common.h"
#include "virtio_mmio.h"

#define DEV_BASE       0xd0000000
#define VNET_VECTOR     0x41
#define VNET_GSI        5

#define NET_F_MAC       (1 << 5)
#define NET_HDR_LEN     12              /* virtio_net_hdr_v1 */
#define ETH_HDR_LEN     14

#define QSIZE           8
#define BUF_LEN         2048            /* header + a 1514-byte frame, rounded up */
#define RX_Q            0
#define TX_Q            1

/* Driver memory (identity-mapped guest RAM). Tests read RX_BUFS back through
 * VmHandle::memory(): buffer i is at RX_BUFS + i * BUF_LEN. */
#define RX_DESC         0x300000
#define RX_AVAIL        0x301000
#define RX_USED         0x302000
#define TX_DESC         0x303000
#define TX_AVAIL        0x304000
#define TX_USED         0x305000
#define RX_BUFS         0x310000
#define TX_BUFS         0x320000
#define DRV_MEM_END     0x330000

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
        movl    $VNET_VECTOR, %edi
        leaq    dev_irq(%rip), %rsi
        call    set_gate
        movl    $TIMER_VECTOR, %edi
        leaq    timer_irq(%rip), %rsi
        call    set_gate

        movl    $LAPIC_BASE, %ebx
        movl    LAPIC_SVR(%rbx), %eax
        orl     $0x1ff, %eax
        movl    %eax, LAPIC_SVR(%rbx)
        movl    $0xb, LAPIC_TMR_DIV(%rbx)
        movl    $(TIMER_VECTOR | 0x20000), LAPIC_LVT_TIMER(%rbx)
        movl    $TIMER_PERIOD, LAPIC_TMR_INIT(%rbx)

        movl    $IOAPIC_BASE, %ebx
        movl    $(0x10 + 2 * VNET_GSI + 1), (%rbx)
        movl    $0, 0x10(%rbx)
        movl    $(0x10 + 2 * VNET_GSI), (%rbx)
        movl    $VNET_VECTOR, 0x10(%rbx)

        movl    $DEV_BASE, %ebx
        movl    R_MAGIC(%rbx), %eax
        cmpl    $VIRTIO_MAGIC, %eax
        jne     no_device
        movl    R_VERSION(%rbx), %eax
        cmpl    $2, %eax
        jne     no_device
        movl    R_DEVICE_ID(%rbx), %eax
        cmpl    $1, %eax                /* network card */
        jne     no_device

        movl    $0, R_STATUS(%rbx)
        movl    $S_ACKNOWLEDGE, R_STATUS(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER), R_STATUS(%rbx)
        movl    $0, R_DEV_FEAT_SEL(%rbx)
        movl    R_DEV_FEAT(%rbx), %eax
        testl   $NET_F_MAC, %eax
        jz      features_rejected
        movl    $1, R_DEV_FEAT_SEL(%rbx)
        movl    R_DEV_FEAT(%rbx), %eax
        testl   $1, %eax                /* VIRTIO_F_VERSION_1 */
        jz      features_rejected
        movl    $0, R_DRV_FEAT_SEL(%rbx)
        movl    $NET_F_MAC, R_DRV_FEAT(%rbx)
        movl    $1, R_DRV_FEAT_SEL(%rbx)
        movl    $1, R_DRV_FEAT(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), R_STATUS(%rbx)
        movl    R_STATUS(%rbx), %eax
        testl   $S_FEATURES_OK, %eax
        jz      features_rejected

        /* The device's MAC, byte by byte from the configuration space. */
        xorl    %ecx, %ecx
1:      movb    R_CONFIG(%rbx,%rcx), %al
        leaq    mac(%rip), %rdx
        movb    %al, (%rdx,%rcx)
        incl    %ecx
        cmpl    $6, %ecx
        jb      1b

        movl    $RX_DESC, %edi
        xorl    %eax, %eax
        movl    $((DRV_MEM_END - RX_DESC) / 8), %ecx
        cld
        rep stosq

        movl    $RX_Q, %edi
        movl    $RX_DESC, %esi
        call    setup_queue
        movl    $TX_Q, %edi
        movl    $TX_DESC, %esi
        call    setup_queue

        /* Receive descriptor i = RX_BUFS + i * BUF_LEN, device-writable; tx descriptors
         * are filled per frame. */
        xorl    %ecx, %ecx
2:      movl    %ecx, %eax
        shll    $11, %eax               /* * BUF_LEN */
        addl    $RX_BUFS, %eax
        movl    %ecx, %edx
        shll    $4, %edx
        movq    %rax, RX_DESC(%rdx)
        movl    $BUF_LEN, RX_DESC + 8(%rdx)
        movw    $DESC_F_WRITE, RX_DESC + 12(%rdx)
        movw    %cx, RX_AVAIL + 4(,%rcx,2)
        incl    %ecx
        cmpl    $QSIZE, %ecx
        jb      2b
        movw    $QSIZE, rx_avail(%rip)
        mfence
        movw    $QSIZE, RX_AVAIL + 2

        movl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%rbx)
        movl    R_STATUS(%rbx), %eax
        cmpl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), %eax
        jne     driver_ok_rejected
        movl    $RX_Q, R_QUEUE_NOTIFY(%rbx)

        leaq    msg_ready(%rip), %rsi
        call    puts
        movl    $0x100, %eax
        call    test_out

/* Main loop: echo every used receive buffer, then sleep until an interrupt (or a timer
 * tick: a lost interrupt only delays, never stalls, the echo). */
echo_loop:
        cli
        movzwl  RX_USED + 2, %eax
        cmpw    rx_seen(%rip), %ax
        jne     1f
        sti
        hlt
        jmp     echo_loop
1:      sti
        movzwl  rx_seen(%rip), %ecx
        andl    $(QSIZE - 1), %ecx
        movl    RX_USED + 4(,%rcx,8), %r12d     /* id: the receive descriptor */
        movl    RX_USED + 8(,%rcx,8), %r13d     /* len: header + frame */
        incw    rx_seen(%rip)
        cmpl    $QSIZE, %r12d
        jae     bad_used
        cmpl    $(NET_HDR_LEN + ETH_HDR_LEN), %r13d
        jb      repost                  /* runt: nothing to echo */
        cmpl    $BUF_LEN, %r13d
        ja      bad_used

        /* Wait for a free transmit slot: at most QSIZE frames in flight. */
2:      movzwl  tx_avail(%rip), %eax
        subw    TX_USED + 2, %ax
        cmpw    $QSIZE, %ax
        jb      3f
        hlt                             /* interrupts are on: the tx interrupt wakes us */
        jmp     2b

3:      movzwl  tx_avail(%rip), %r14d
        andl    $(QSIZE - 1), %r14d     /* tx slot = descriptor = buffer index */
        movl    %r12d, %esi
        shll    $11, %esi
        addl    $RX_BUFS, %esi
        movl    %r14d, %edi
        shll    $11, %edi
        addl    $TX_BUFS, %edi
        movl    %edi, %r15d
        movl    %r13d, %ecx
        cld
        rep movsb
        /* A clean header (no offloads); dst MAC := src MAC; src MAC := ours. */
        movq    $0, (%r15)
        movl    $0, 8(%r15)
        movl    NET_HDR_LEN + 6(%r15), %eax
        movl    %eax, NET_HDR_LEN(%r15)
        movw    NET_HDR_LEN + 10(%r15), %ax
        movw    %ax, NET_HDR_LEN + 4(%r15)
        movl    mac(%rip), %eax
        movl    %eax, NET_HDR_LEN + 6(%r15)
        movw    mac + 4(%rip), %ax
        movw    %ax, NET_HDR_LEN + 10(%r15)

        movl    %r14d, %edx
        shll    $4, %edx
        movq    %r15, TX_DESC(%rdx)
        movl    %r13d, TX_DESC + 8(%rdx)
        movw    $0, TX_DESC + 12(%rdx)
        movzwl  tx_avail(%rip), %eax
        movl    %eax, %ecx
        andl    $(QSIZE - 1), %ecx
        movw    %r14w, TX_AVAIL + 4(,%rcx,2)
        incl    %eax
        movw    %ax, tx_avail(%rip)
        mfence
        movw    %ax, TX_AVAIL + 2
        mfence
        movl    $TX_Q, R_QUEUE_NOTIFY(%rbx)

        incl    echoed(%rip)
        movzbl  echoed(%rip), %eax
        orl     $0x200, %eax
        call    test_out

repost: /* Give the receive buffer back. */
        movzwl  rx_avail(%rip), %eax
        movl    %eax, %ecx
        andl    $(QSIZE - 1), %ecx
        movw    %r12w, RX_AVAIL + 4(,%rcx,2)
        incl    %eax
        movw    %ax, rx_avail(%rip)
        mfence
        movw    %ax, RX_AVAIL + 2
        mfence
        movl    $RX_Q, R_QUEUE_NOTIFY(%rbx)
        jmp     echo_loop

#include "virtio_driver.S"

        .section .rodata
msg_ready:      .asciz "virtio-net ready\n"
msg_no_device:  .asciz "virtio-net: no device\n"
msg_features:   .asciz "virtio-net: features rejected\n"
msg_queue:      .asciz "virtio-net: queue too small\n"
msg_driver_ok:  .asciz "virtio-net: driver_ok rejected\n"
msg_bad_used:   .asciz "virtio-net: bad used ring\n"

        .data
        .balign 4
echoed:         .long 0                 /* frames echoed */
mac:            .byte 0, 0, 0, 0, 0, 0, 0, 0
rx_avail:       .word 0                 /* next rx avail.idx */
rx_seen:        .word 0                 /* rx used entries consumed */
tx_avail:       .word 0                 /* next tx avail.idx */

#include "common64.S"

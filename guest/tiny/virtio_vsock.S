/*
 * virtio_vsock: a minimal virtio-vsock driver for the first virtio-mmio slot (0xd0000000,
 * GSI 5) that answers like an echo server on every port (see README.md, "virtio_vsock in
 * detail"):
 *
 *   REQUEST          -> RESPONSE (accept any connection)
 *   RW (n bytes)     -> RW with the same n bytes (echo), fwd_cnt += n
 *   SHUTDOWN         -> RST
 *   CREDIT_REQUEST   -> CREDIT_UPDATE
 *   RESPONSE, RST, CREDIT_UPDATE, anything else -> nothing
 *
 * After answering its first REQUEST it also dials the host once: REQUEST from guest port
 * 1024 to CID 2 port 9999 (the echo rules then serve that connection too).
 *
 *   TEST_PORT  0x100 once the queues are live, 0x400 | op for every packet received
 *   serial     "virtio-vsock ready\n", or a "virtio-vsock: ...\n" diagnostic, then reset.
 *
 * Features: VIRTIO_F_VERSION_1 only. Receive buffers are single 4 KiB descriptors (header
 * and payload together, as Linux posts them); every reply is one descriptor.
 */
#include "common.h"
#include "virtio_mmio.h"

#define DEV_BASE         0xd0000000
#define VS_VECTOR       0x41
#define VS_GSI          5

/* struct virtio_vsock_hdr (44 bytes, little endian) */
#define H_SRC_CID       0
#define H_DST_CID       8
#define H_SRC_PORT      16
#define H_DST_PORT      20
#define H_LEN           24
#define H_TYPE          28
#define H_OP            30
#define H_FLAGS         32
#define H_BUF_ALLOC     36
#define H_FWD_CNT       40
#define HDR_LEN         44

#define OP_REQUEST      1
#define OP_RESPONSE     2
#define OP_RST          3
#define OP_SHUTDOWN     4
#define OP_RW           5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM     1
#define HOST_CID        2
#define BUF_ALLOC       65536
#define DIAL_SRC_PORT   1024
#define DIAL_DST_PORT   9999

#define QSIZE           8
#define BUF_LEN         4096
#define RX_Q            0
#define TX_Q            1

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
        call    map_apic
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $VS_VECTOR, %edi
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
        movl    $(0x10 + 2 * VS_GSI + 1), (%rbx)
        movl    $0, 0x10(%rbx)
        movl    $(0x10 + 2 * VS_GSI), (%rbx)
        movl    $VS_VECTOR, 0x10(%rbx)

        movl    $DEV_BASE, %ebx
        movl    R_MAGIC(%rbx), %eax
        cmpl    $VIRTIO_MAGIC, %eax
        jne     no_device
        movl    R_VERSION(%rbx), %eax
        cmpl    $2, %eax
        jne     no_device
        movl    R_DEVICE_ID(%rbx), %eax
        cmpl    $19, %eax               /* socket device */
        jne     no_device

        movl    $0, R_STATUS(%rbx)
        movl    $S_ACKNOWLEDGE, R_STATUS(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER), R_STATUS(%rbx)
        movl    $1, R_DEV_FEAT_SEL(%rbx)
        movl    R_DEV_FEAT(%rbx), %eax
        testl   $1, %eax                /* VIRTIO_F_VERSION_1 */
        jz      features_rejected
        movl    $0, R_DRV_FEAT_SEL(%rbx)
        movl    $0, R_DRV_FEAT(%rbx)
        movl    $1, R_DRV_FEAT_SEL(%rbx)
        movl    $1, R_DRV_FEAT(%rbx)
        movl    $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), R_STATUS(%rbx)
        movl    R_STATUS(%rbx), %eax
        testl   $S_FEATURES_OK, %eax
        jz      features_rejected

        movl    R_CONFIG(%rbx), %eax    /* guest_cid, low half (CIDs here fit 32 bits) */
        movl    %eax, guest_cid(%rip)

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

        xorl    %ecx, %ecx
2:      movl    %ecx, %eax
        shll    $12, %eax               /* * BUF_LEN */
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

main_loop:
        cli
        movzwl  RX_USED + 2, %eax
        cmpw    rx_seen(%rip), %ax
        jne     1f
        sti
        hlt
        jmp     main_loop
1:      sti
        movzwl  rx_seen(%rip), %ecx
        andl    $(QSIZE - 1), %ecx
        movl    RX_USED + 4(,%rcx,8), %r12d     /* id */
        movl    RX_USED + 8(,%rcx,8), %r13d     /* len */
        incw    rx_seen(%rip)
        cmpl    $QSIZE, %r12d
        jae     bad_used
        cmpl    $BUF_LEN, %r13d
        ja      bad_used
        cmpl    $HDR_LEN, %r13d
        jb      repost
        movl    %r12d, %esi
        shll    $12, %esi
        addl    $RX_BUFS, %esi          /* %rsi: the received packet */
        movzwl  H_OP(%rsi), %eax
        pushq   %rax
        orl     $0x400, %eax
        call    test_out
        popq    %rax

        cmpl    $OP_REQUEST, %eax
        je      on_request
        cmpl    $OP_RW, %eax
        je      on_rw
        cmpl    $OP_SHUTDOWN, %eax
        je      on_shutdown
        cmpl    $OP_CREDIT_REQUEST, %eax
        je      on_credit_request
        jmp     repost

on_request:
        movl    $OP_RESPONSE, %edx
        xorl    %ecx, %ecx
        call    reply
        cmpb    $0, dialed(%rip)
        jne     repost
        movb    $1, dialed(%rip)
        call    dial
        jmp     repost

on_rw:
        movl    H_LEN(%rsi), %ecx
        leal    -HDR_LEN(%r13), %eax    /* payload bytes actually received */
        cmpl    %eax, %ecx
        jbe     2f
        movl    %eax, %ecx
2:      addl    %ecx, fwd_cnt(%rip)
        movl    $OP_RW, %edx
        call    reply
        jmp     repost

on_shutdown:
        movl    $OP_RST, %edx
        xorl    %ecx, %ecx
        call    reply
        jmp     repost

on_credit_request:
        movl    $OP_CREDIT_UPDATE, %edx
        xorl    %ecx, %ecx
        call    reply
        jmp     repost

repost:
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
        jmp     main_loop

/*
 * reply: %rsi = received packet, %edx = op, %ecx = payload bytes to copy from the packet.
 * Sends one packet back on the same connection (ports and CIDs swapped).
 */
reply:
        pushq   %rsi
        call    tx_slot                 /* %rdi = buffer, %r14d = slot */
        movl    guest_cid(%rip), %eax
        movq    %rax, H_SRC_CID(%rdi)
        movq    H_SRC_CID(%rsi), %rax
        movq    %rax, H_DST_CID(%rdi)
        movl    H_DST_PORT(%rsi), %eax
        movl    %eax, H_SRC_PORT(%rdi)
        movl    H_SRC_PORT(%rsi), %eax
        movl    %eax, H_DST_PORT(%rdi)
        movl    %ecx, H_LEN(%rdi)
        movw    $TYPE_STREAM, H_TYPE(%rdi)
        movw    %dx, H_OP(%rdi)
        movl    $0, H_FLAGS(%rdi)
        movl    $BUF_ALLOC, H_BUF_ALLOC(%rdi)
        movl    fwd_cnt(%rip), %eax
        movl    %eax, H_FWD_CNT(%rdi)
        pushq   %rcx
        pushq   %rdi
        addq    $HDR_LEN, %rsi
        addq    $HDR_LEN, %rdi
        cld
        rep movsb
        popq    %rdi
        popq    %rcx
        addl    $HDR_LEN, %ecx
        call    tx_send
        popq    %rsi
        ret

/* dial: REQUEST from guest port DIAL_SRC_PORT to the host's port DIAL_DST_PORT. */
dial:
        call    tx_slot
        movl    guest_cid(%rip), %eax
        movq    %rax, H_SRC_CID(%rdi)
        movq    $HOST_CID, H_DST_CID(%rdi)
        movl    $DIAL_SRC_PORT, H_SRC_PORT(%rdi)
        movl    $DIAL_DST_PORT, H_DST_PORT(%rdi)
        movl    $0, H_LEN(%rdi)
        movw    $TYPE_STREAM, H_TYPE(%rdi)
        movw    $OP_REQUEST, H_OP(%rdi)
        movl    $0, H_FLAGS(%rdi)
        movl    $BUF_ALLOC, H_BUF_ALLOC(%rdi)
        movl    fwd_cnt(%rip), %eax
        movl    %eax, H_FWD_CNT(%rdi)
        movl    $HDR_LEN, %ecx
        call    tx_send
        ret

/* tx_slot: waits for a free transmit slot; returns %rdi = its buffer, %r14d = slot. */
tx_slot:
1:      movzwl  tx_avail(%rip), %eax
        subw    TX_USED + 2, %ax
        cmpw    $QSIZE, %ax
        jb      2f
        hlt
        jmp     1b
2:      movzwl  tx_avail(%rip), %r14d
        andl    $(QSIZE - 1), %r14d
        movl    %r14d, %edi
        shll    $12, %edi
        addl    $TX_BUFS, %edi
        ret

/* tx_send: %rdi = buffer of slot %r14d, %ecx = bytes; publishes and notifies. */
tx_send:
        movl    %r14d, %edx
        shll    $4, %edx
        movq    %rdi, TX_DESC(%rdx)
        movl    %ecx, TX_DESC + 8(%rdx)
        movw    $0, TX_DESC + 12(%rdx)
        movzwl  tx_avail(%rip), %eax
        movl    %eax, %edx
        andl    $(QSIZE - 1), %edx
        movw    %r14w, TX_AVAIL + 4(,%rdx,2)
        incl    %eax
        movw    %ax, tx_avail(%rip)
        mfence
        movw    %ax, TX_AVAIL + 2
        mfence
        movl    $TX_Q, R_QUEUE_NOTIFY(%rbx)
        ret

#include "virtio_driver.S"

        .section .rodata
msg_ready:      .asciz "virtio-vsock ready\n"
msg_no_device:  .asciz "virtio-vsock: no device\n"
msg_features:   .asciz "virtio-vsock: features rejected\n"
msg_queue:      .asciz "virtio-vsock: queue too small\n"
msg_driver_ok:  .asciz "virtio-vsock: driver_ok rejected\n"
msg_bad_used:   .asciz "virtio-vsock: bad used ring\n"

        .data
        .balign 4
guest_cid:      .long 0
fwd_cnt:        .long 0                 /* payload bytes received (and echoed) so far */
rx_avail:       .word 0
rx_seen:        .word 0
tx_avail:       .word 0
dialed:         .byte 0

#include "common64.S"

/*
 * Shared by the virtio_net and virtio_vsock tiny guests (#included before their data):
 * queue set-up, the diagnostics-then-reset exits, and the device and timer interrupt
 * handlers. The includer defines DEV_BASE (its virtio-mmio window), QSIZE, and the
 * msg_no_device / msg_features / msg_queue / msg_driver_ok / msg_bad_used strings.
 */
/* setup_queue: %edi = queue index, %esi = descriptor table (avail +0x1000, used +0x2000). */
setup_queue:
        movl    %edi, R_QUEUE_SEL(%rbx)
        movl    R_QUEUE_NUM_MAX(%rbx), %eax
        cmpl    $QSIZE, %eax
        jb      queue_too_small
        movl    $QSIZE, R_QUEUE_NUM(%rbx)
        movl    %esi, R_DESC_LO(%rbx)
        movl    $0, R_DESC_HI(%rbx)
        leal    0x1000(%rsi), %eax
        movl    %eax, R_AVAIL_LO(%rbx)
        movl    $0, R_AVAIL_HI(%rbx)
        leal    0x2000(%rsi), %eax
        movl    %eax, R_USED_LO(%rbx)
        movl    $0, R_USED_HI(%rbx)
        movl    $1, R_QUEUE_READY(%rbx)
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
bad_used:
        leaq    msg_bad_used(%rip), %rsi
fail_device:
        call    puts
        movl    $DEV_BASE, %ebx
        movl    R_STATUS(%rbx), %eax
        orl     $S_FAILED, %eax
        movl    %eax, R_STATUS(%rbx)
        jmp     reset

dev_irq:
        pushq   %rax
        pushq   %rbx
        movl    $DEV_BASE, %ebx
        movl    R_INT_STATUS(%rbx), %eax
        movl    %eax, R_INT_ACK(%rbx)
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_EOI(%rbx)
        popq    %rbx
        popq    %rax
        iretq

timer_irq:
        pushq   %rbx
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_EOI(%rbx)
        popq    %rbx
        iretq


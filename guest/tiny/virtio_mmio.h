/* virtio-mmio (version 2) register offsets and status/descriptor bits, shared by the
 * virtio tiny guests (virtio 1.2, section 4.2.2). */
#define VIRTIO_MAGIC    0x74726976      /* "virt" */
#define R_MAGIC         0x000
#define R_VERSION       0x004
#define R_DEVICE_ID     0x008
#define R_DEV_FEAT      0x010
#define R_DEV_FEAT_SEL  0x014
#define R_DRV_FEAT      0x020
#define R_DRV_FEAT_SEL  0x024
#define R_QUEUE_SEL     0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM     0x038
#define R_QUEUE_READY   0x044
#define R_QUEUE_NOTIFY  0x050
#define R_INT_STATUS    0x060
#define R_INT_ACK       0x064
#define R_STATUS        0x070
#define R_DESC_LO       0x080
#define R_DESC_HI       0x084
#define R_AVAIL_LO      0x090
#define R_AVAIL_HI      0x094
#define R_USED_LO       0x0a0
#define R_USED_HI       0x0a4
#define R_CONFIG        0x100           /* device-specific configuration space */

#define S_ACKNOWLEDGE   1
#define S_DRIVER        2
#define S_DRIVER_OK     4
#define S_FEATURES_OK   8
#define S_FAILED        0x80

#define DESC_F_NEXT     1
#define DESC_F_WRITE    2

/* LAPIC timer, used by the virtio guests so that every hlt wakes up. */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TMR_INIT  0x380
#define LAPIC_TMR_DIV   0x3e0
#define TIMER_VECTOR    0x42
#define TIMER_PERIOD    10000000        /* 10 ms at KVM's 1 GHz APIC bus, divide by 1 */

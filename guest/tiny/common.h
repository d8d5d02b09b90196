/* Constants shared by the tiny guests (see README.md). */
#define COM1            0x3f8           /* 16550 THR */
#define COM1_LSR        0x3fd           /* line status; bit 5 = THR empty */
#define I8042_CMD       0x64            /* 0xfe = pulse reset line */
#define PM1A_CNT        0x604           /* ACPI PM1a control (QEMU layout) */
#define SLP_EN          0x2000
#define TEST_PORT       0x510           /* 32-bit test event port */
#define LAPIC_BASE      0xfee00000
#define LAPIC_ID        0x020
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define IOAPIC_BASE     0xfec00000
#define SEL_CODE64      0x08
#define SEL_DATA        0x10
#define SEL_CODE32      0x18

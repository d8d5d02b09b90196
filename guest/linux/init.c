/*
 * The init (PID 1) of the initramfs that tests/linux_boot.rs boots real Linux with.
 * Built by the test with `gcc -static -O2`; no checked-in binary.
 *
 * It prints, on the console:
 *   smolvm-init: hello
 *   smolvm-init: cpus=N (online LIST)
 * and then reboots with reboot(RB_AUTOBOOT), which a kernel booted with `reboot=k` turns
 * into an i8042 reset (the VMM reports ExitReason::Reset). Should the reboot fail, init
 * exits, the kernel panics ("Attempted to kill init!") and `panic=1` resets as well.
 *
 * The CPU count comes from /sys/devices/system/cpu/online (init mounts sysfs itself: an
 * initramfs has nothing mounted), falling back to the affinity mask of init.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

static int out = 1;

static void say(const char *s)
{
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = write(out, s, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        s += n;
        len -= (size_t)n;
    }
}

/* Counts the CPUs in a kernel CPU list such as "0-1,4,6-7". */
static int count_cpu_list(const char *list)
{
    int count = 0;
    const char *p = list;
    while (*p >= '0' && *p <= '9') {
        char *end;
        long lo = strtol(p, &end, 10), hi = lo;
        if (*end == '-')
            hi = strtol(end + 1, &end, 10);
        if (hi < lo)
            return -1;
        count += (int)(hi - lo + 1);
        if (*end != ',')
            break;
        p = end + 1;
    }
    return count;
}

int main(void)
{
    char buf[256], online[128] = "?";
    int cpus = -1;

    /* The kernel opened /dev/console as fds 0-2 if it could; open it again to be sure. */
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd >= 0)
        out = fd;

    say("smolvm-init: hello\n");

    mkdir("/sys", 0555);
    if (mount("sysfs", "/sys", "sysfs", 0, NULL) == 0 || errno == EBUSY) {
        int f = open("/sys/devices/system/cpu/online", O_RDONLY);
        if (f >= 0) {
            ssize_t n = read(f, online, sizeof(online) - 1);
            online[n > 0 ? n : 0] = '\0';
            online[strcspn(online, "\n")] = '\0';
            cpus = count_cpu_list(online);
            close(f);
        }
    }
    if (cpus <= 0) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0)
            cpus = CPU_COUNT(&set);
    }
    snprintf(buf, sizeof(buf), "smolvm-init: cpus=%d (online %s)\n", cpus, online);
    say(buf);

    /* The UART transmits from the tty buffer asynchronously: wait until it is all out. */
    tcdrain(out);
    sync();
    reboot(RB_AUTOBOOT);

    snprintf(buf, sizeof(buf), "smolvm-init: reboot failed: %s\n", strerror(errno));
    say(buf);
    tcdrain(out);
    return 1;
}

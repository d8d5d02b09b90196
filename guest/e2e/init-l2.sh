#!/bin/sh
# /init of the e2e guest (L2): loads the virtio/vsock/ext4 modules, prints markers on the
# console and starts the smolvm agent. With `smolvm_e2e=reboot` on the kernel command line it
# reports the CPU count and reboots instead. Keep console output short: every byte is a
# VM exit.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo SMOLVM-E2E-INIT >/dev/console
echo "SMOLVM-E2E-CPUS $(grep -c ^processor /proc/cpuinfo)" >/dev/console
case " $(cat /proc/cmdline) " in
*" smolvm_e2e=reboot "*)
    reboot -f
    sleep 10
    ;;
*" smolvm_e2e=poweroff "*)
    poweroff -f
    sleep 10
    ;;
esac
while read -r m; do
    insmod "/lib/modules/$m" 2>/dev/null || echo "SMOLVM-E2E-INSMOD-FAILED $m" >/dev/console
done </etc/modules.load
ip link set lo up 2>/dev/null
/sbin/smolvm-agent </dev/null >/dev/console 2>&1 &
# PID 1 stays: reap orphans, never exit (the kernel would panic).
while :; do
    wait
    sleep 1
done

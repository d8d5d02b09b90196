#!/bin/sh
# /init of the emulated arm64 machine (L1): runs the e2e runner against this machine's
# /dev/kvm, prints its output between markers, powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
while read -r m; do
    insmod "/lib/modules/$m" || echo "SMOLVM-L1 insmod $m failed"
done </etc/modules.load
ip link set lo up
# SMOLVM_E2E_* settings handed over by run.sh
[ -f /e2e/env ] && . /e2e/env
echo "SMOLVM-L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime)s kvm=$(ls -l /dev/kvm 2>&1)"
/sbin/smolvm-e2e run --assets /e2e/assets --out /tmp/e2e-out 2>/tmp/runner.stderr
rc=$?
echo "SMOLVM-L1-END rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)s"
if [ "$rc" != 0 ]; then
    echo "SMOLVM-L1 runner stderr (tail):"
    tail -n 40 /tmp/runner.stderr
    for f in /tmp/e2e-out/*.console.log; do
        [ -e "$f" ] || continue
        echo "SMOLVM-L1 $f (tail):"
        tail -c 3000 "$f"
        echo
    done
else
    sed 's/^/runner: /' /tmp/runner.stderr
fi
sync
poweroff -f

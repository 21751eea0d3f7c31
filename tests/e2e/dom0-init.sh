#!/bin/sh
# PID 1 of the test dom0 (instead of systemd): bring up just enough of Xen's toolstack to create guests,
# run the dom0 test driver from the read-only 9p share, power off.  Every line that matters to the host test
# goes to the console (hvc0 -> Xen -> com1 -> the host's serial log): "STAGE <name>" and "RESULT ..." lines.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export PYTHONDONTWRITEBYTECODE=1 # the share is read-only
XENBIN=/usr/lib/xen-4.17/bin

say() { echo "$*" > /dev/console 2>/dev/null || echo "$*"; }
fail_boot() {
    say "RESULT dom0-boot FAIL $*"
    say "PVBACK-E2E-DONE"
    busybox poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mkdir -p /run/xen /run/xenstored /var/run /var/log/xen/console /var/lib/xen
exec > /dev/console 2>&1
say "STAGE dom0-init"

# No xen-blkback/xen-netback: with them loaded the kernel races the userspace backend for the same devices
# (real-xen-under-qemu.md, section 5).  Nothing else would load them: there is no udev running.  tun: pvback's
# netback creates the guests' taps through /dev/net/tun, which without udev only exists once the module is loaded.
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs 9p 9pnet_virtio loop tun; do
    modprobe "$m" || say "modprobe $m failed"
done
ip link set lo up || say "cannot bring up lo (pvback's metrics endpoint listens on 127.0.0.1)"
mount -t xenfs xenfs /proc/xen || fail_boot "cannot mount xenfs"
mount -t 9p -o trans=virtio,version=9p2000.L,ro host0 /mnt/host || fail_boot "cannot mount the 9p share host0"
mount -t 9p -o trans=virtio,version=9p2000.L out0 /mnt/out || say "no writable out0 share (logs stay in dom0)"

TESTS=$(sed -n 's/.*pvtests=\([^ ]*\).*/\1/p' /proc/cmdline)
# In the foreground of a subshell, so that its end is on the console with its status and its last words (it
# daemonizes to /dev/null otherwise).  The driver-domain checks trace every request: what a guest domain sent
# last, should xenstored go away mid-run (seen with a driver domain).
XS_TRACE=
case "+$TESTS+" in *+dd-*) XS_TRACE=/var/log/xen/xenstored-trace.log ;; esac
(
    "$XENBIN/xenstored" --no-fork --pid-file /run/xenstore.pid ${XS_TRACE:+--trace-file "$XS_TRACE"} \
        > /var/log/xen/xenstored.log 2>&1
    rc=$?
    say "DOM0 xenstored exited with status $rc; its log: $(tail -n 5 /var/log/xen/xenstored.log | tr '\n' '|')"
) &
i=0
while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -S /run/xenstored/socket ] || fail_boot "xenstored socket did not appear within 10 s"
"$XENBIN/xen-init-dom0" > /tmp/xen-init-dom0.log 2>&1 || fail_boot "xen-init-dom0 failed: $(tail -n 3 /tmp/xen-init-dom0.log)"
"$XENBIN/xenconsoled" --log=guest --log-dir=/var/log/xen/console || fail_boot "xenconsoled did not start"
xl list > /dev/null 2>&1 || fail_boot "xl list does not work"
say "STAGE xen-tools"

DRIVER=/mnt/host/tests/e2e/dom0/run_tests.py
if [ -f "$DRIVER" ]; then
    # The driver bounds each test itself; this bounds the driver.
    # 1 = some check failed (its RESULT line says why); anything else = the driver itself broke or hung.
    timeout -k 5 2400 python3 "$DRIVER" --tests "${TESTS:-all}"
    rc=$?
    [ $rc -le 1 ] || say "RESULT dom0-driver FAIL exited with $rc (124: still running after 2400 s)"
else
    say "RESULT dom0-driver FAIL $DRIVER not found on the share"
fi
sync
say "PVBACK-E2E-DONE"
busybox poweroff -f

#!/bin/busybox sh
# /init of the driver domain's initramfs (tests/e2e/build-dd.sh): load xen-blkfront and ext4, mount the root disk
# that dom0's `pvback serve` serves as xvda, hand over to its /sbin/dd-init.  Console lines: "DD-INITRAMFS ...".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "DD-INITRAMFS start $(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /lib/modules/order
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
# Whole-MiB reads: every read of the root disk is a round trip to dom0's pvback.
echo 4096 > /sys/block/xvda/queue/read_ahead_kb 2>/dev/null
if [ ! -b /dev/xvda ] || ! mount -t ext4 -o rw /dev/xvda /newroot; then
    echo "DD-INITRAMFS FAIL no root disk (xvda present: $([ -b /dev/xvda ] && echo yes || echo no))"
    sleep 2
    poweroff -f
fi
echo "DD-INITRAMFS root mounted $(cut -d' ' -f1 /proc/uptime)"
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/dd-init

#!/bin/busybox sh
# /init of the test domU (busybox initramfs).  The kernel command line picks one test:
#   pvtest=NAME   boot | rw | fs | big | discard | ro | hotplug | reboot
#   pvexpect=SHA  sha256 dom0 expects for the region the test reads first
# Results go to the console (hvc0, logged by xenconsoled in dom0), one per line:
#   DOMU <test> PASS|FAIL <detail>      the domU's own verdict
#   DOMU-KV <key> <value>               facts dom0 checks against the image file
#   DOMU-PHASE <name>                   progress dom0 synchronises on (hotplug, reboot)
#   DOMU-DONE                           last line before poweroff
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp

TEST=$(sed -n 's/.*pvtest=\([^ ]*\).*/\1/p' /proc/cmdline)
EXPECT=$(sed -n 's/.*pvexpect=\([^ ]*\).*/\1/p' /proc/cmdline)
MiB=1048576
DEV=/dev/xvda

say() { echo "$*"; }
finish() {
    sync
    say "DOMU-DONE"
    poweroff -f
    sleep 60
}
pass() { say "DOMU $TEST PASS $*"; finish; }
fail() { say "DOMU $TEST FAIL $*"; finish; }


wait_for() { # wait_for EXPR SECONDS
    i=0
    while ! eval "$1"; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
    return 0
}
dropcache() { blockdev --flushbufs $DEV 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches; }
region_sha() { # region_sha OFFSET_MIB COUNT_MIB
    dd if=$DEV bs=$MiB skip="$1" count="$2" 2>/dev/null | sha256sum | cut -d' ' -f1
}
# Write COUNT_MIB of fresh random data at OFFSET_MIB, read it back uncached; prints the sha on success.
write_region() {
    dd if=/dev/urandom of=/tmp/w bs=$MiB count="$2" 2>/dev/null
    want=$(sha256sum /tmp/w | cut -d' ' -f1)
    dd if=/tmp/w of=$DEV bs=$MiB seek="$1" conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; return 1; }
    rm -f /tmp/w
    dropcache
    got=$(region_sha "$1" "$2")
    [ "$got" = "$want" ] || { echo "readback $got != written $want"; return 1; }
    echo "$want"
}

say "DOMU-PHASE init $TEST $(uname -r)"
if [ "$TEST" = boot ] || [ -z "$TEST" ]; then
    # Before any module: loading xen-blkfront blocks (up to 5 min) while a vbd it knows is not connected.
    TEST=boot
    pass "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vcpu"
fi

# Modules in dependency order (build.sh wrote the list).
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /lib/modules/order
say "DOMU-PHASE modules"

wait_for "[ -b $DEV ]" 30 || fail "$DEV did not appear within 30 s (blkfront never connected)"
say "DOMU-KV sectors $(cat /sys/block/xvda/size)"
say "DOMU-KV ro $(cat /sys/block/xvda/ro)"

case $TEST in
rw)
    got=$(region_sha 1 1)
    [ "$got" = "$EXPECT" ] || fail "read of dom0's data: sha $got, dom0 wrote $EXPECT"
    w=$(write_region 2 1) || fail "write/readback: $w"
    say "DOMU-KV wsha $w"
    pass "read dom0's 1 MiB, wrote+reread 1 MiB"
    ;;
big)
    t0=$(date +%s)
    got=$(region_sha 64 64)
    t1=$(date +%s)
    [ "$got" = "$EXPECT" ] || fail "64 MiB read: sha $got, dom0 wrote $EXPECT"
    w=$(write_region 128 64) || fail "64 MiB write/readback: $w"
    t2=$(date +%s)
    say "DOMU-KV wsha $w"
    pass "64 MiB read in $((t1 - t0)) s, 64 MiB write+reread in $((t2 - t1)) s"
    ;;
fs)
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 $DEV > /tmp/mkfs.log 2>&1 \
        || fail "mkfs.ext4: $(tail -n 2 /tmp/mkfs.log)"
    mount -t ext4 $DEV /mnt || fail "mount after mkfs failed"
    mkdir -p /mnt/d
    i=0
    while [ $i -lt 100 ]; do echo "file $i $(date)" > /mnt/d/f$i; i=$((i + 1)); done
    dd if=/dev/urandom of=/mnt/big bs=$MiB count=8 2>/dev/null
    want=$(sha256sum /mnt/big | cut -d' ' -f1)
    sync
    umount /mnt || fail "umount failed"
    dropcache
    mount -t ext4 -o ro $DEV /mnt || fail "remount failed"
    got=$(sha256sum /mnt/big | cut -d' ' -f1)
    n=$(ls /mnt/d | wc -l)
    umount /mnt
    [ "$got" = "$want" ] || fail "8 MiB file changed across umount/mount: $got != $want"
    [ "$n" = 100 ] || fail "expected 100 files, found $n"
    e2fsck -fn $DEV > /tmp/fsck.log 2>&1 || fail "e2fsck -fn: $(tail -n 3 /tmp/fsck.log | tr '\n' ' ')"
    say "DOMU-KV bigsha $want"
    pass "mkfs.ext4, 100 files + 8 MiB, umount/mount, e2fsck -fn clean"
    ;;
discard)
    w=$(write_region 8 4) || fail "write before discard: $w"
    cat /sys/block/xvda/queue/discard_max_bytes > /tmp/dmax
    blkdiscard -o $((8 * MiB)) -l $((4 * MiB)) $DEV 2>/tmp/bd.err \
        || fail "blkdiscard: $(cat /tmp/bd.err) (discard_max_bytes=$(cat /tmp/dmax))"
    dropcache
    z=$(dd if=/dev/zero bs=$MiB count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
    got=$(region_sha 8 4)
    [ "$got" = "$z" ] && say "DOMU-KV discard-zeroed yes" || say "DOMU-KV discard-zeroed no"
    pass "blkdiscard of 4 MiB accepted"
    ;;
ro)
    [ "$(cat /sys/block/xvda/ro)" = 1 ] || fail "disk attached read-only but /sys/block/xvda/ro is not 1"
    got=$(region_sha 1 1)
    [ "$got" = "$EXPECT" ] || fail "read: sha $got, dom0 wrote $EXPECT"
    if dd if=/dev/zero of=$DEV bs=4096 count=1 seek=256 conv=fsync 2>/tmp/dd.err; then
        fail "a write to the read-only disk succeeded"
    fi
    pass "reads work, write refused: $(head -n 1 /tmp/dd.err)"
    ;;
hotplug)
    got=$(region_sha 1 1)
    [ "$got" = "$EXPECT" ] || fail "first attach: sha $got, dom0 wrote $EXPECT"
    say "DOMU-PHASE attached"
    wait_for "[ ! -b $DEV ]" 60 || fail "$DEV still present 60 s after dom0 started detaching"
    say "DOMU-PHASE detached"
    wait_for "[ -b $DEV ]" 60 || fail "$DEV did not come back within 60 s of detaching"
    got=$(region_sha 1 1)
    [ "$got" = "$EXPECT" ] || fail "after re-attach: sha $got, dom0 wrote $EXPECT"
    pass "detached and re-attached while running, data intact"
    ;;
reboot)
    mark=$(dd if=$DEV bs=512 skip=$((200 * 2048)) count=1 2>/dev/null | head -c 5)
    case $mark in
    BOOT0)
        printf 'BOOT1' | dd of=$DEV bs=512 seek=$((200 * 2048)) conv=sync,fsync 2>/dev/null \
            || fail "cannot write the boot marker"
        say "DOMU-PHASE rebooting"
        sync
        reboot -f
        sleep 60
        ;;
    BOOT1) pass "reconnected after reboot, marker written before reboot is there" ;;
    *) fail "unexpected boot marker '$mark'" ;;
    esac
    ;;
*) fail "unknown test '$TEST'" ;;
esac

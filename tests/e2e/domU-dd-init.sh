#!/bin/busybox sh
# /init-dd of the test domU's initramfs (rdinit=/init-dd): the guest of the driver-domain checks (#19).  Its disk
# and NIC are served by `pvback serve` inside the driver domain (xl: disk=['backend=pvdd,backendtype=qdisk,...'],
# vif=['backend=pvdd,mac=...,script=vif-pvback']); tests/e2e/dom0/driver_domain.py drives it.
#   xvda (96 MiB, an image in the driver domain):  [64,65) MiB written by the driver domain (sha pvdd64= on the
#         command line) is read, [66,67) written (the driver domain hashes the image), an ext4 of 32 MiB at the
#         start, [40,56) rewritten round after round while the driver domain SIGKILLs and restarts pvback (the new
#         daemon writes "RESTARTED" at 88 MiB), the boot marker at 90 MiB
#   eth0  198.18.9.2/24, routed by the driver domain (its tap end 198.18.9.1) to dom0 (198.18.8.1, the tap of the
#         driver domain's own vif): ping, 2 MiB each way over TCP
# Console lines, as domU-init.sh's: DOMU-RESULT <step> PASS|FAIL <detail>, DOMU-KV <key> <value>,
# DOMU-PHASE <name>, DOMU-KLOG <step> error|info: <line>, DOMU-DONE.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
. /guest-lib.sh
guest_mounts
STEPS=$(arg pvsteps)
A=/dev/xvda
MARK_SECT=$((90 * 2048))
RESTART_SECT=$((88 * 2048))
want() { case "+$STEPS+" in *"+$1+"*) true ;; *) false ;; esac; }
# The kernel's block/fs/net complaints since the last step: a step that passed fails on one.
klog_bad() { # klog_bad STEP: true if /tmp/klog.rel holds an error line (each line is reported)
    bad=1
    while IFS= read -r line; do
        case $line in
        *"op failed"* | *"I/O error"* | *blk_update_request* | *"EXT4-fs error"* | *"disabled for further use"* | \
            *"Kernel panic"* | *"BUG:"* | *Oops* | *"wrong operation"*) kind=error ;;
        *) kind=info ;;
        esac
        say "DOMU-KLOG $1 $kind: $line"
        [ $kind = error ] && { [ $bad = 0 ] || first=$line; bad=0; }
    done < /tmp/klog.rel 2>/dev/null
    return $bad
}
result() { # result STEP PASS|FAIL DETAIL
    step=$1 verdict=$2
    shift 2
    detail=$*
    dmesg > /tmp/klog.all 2>/dev/null
    grep -E 'blkfront|op failed|I/O error|blk_update_request|EXT4-fs error|disabled for further use|netfront|xennet|Oops|BUG:' \
        /tmp/klog.all > /tmp/klog.rel
    dmesg -c > /dev/null 2>&1
    if klog_bad "$step" && [ "$verdict" = PASS ]; then
        verdict=FAIL
        detail="guest kernel: $first (the step itself passed: $detail)"
    fi
    say "DOMU-RESULT $step $verdict $detail"
}
sector_text() { dd if=$A bs=512 skip="$1" count=1 2>/dev/null | tr -d '\0' | head -c 120; }

say "DOMU-PHASE init $(uname -r)"
result boot PASS "kernel $(uname -r), /init-dd at $(now) s"
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /lib/modules/order
ALL="rw fs net restart reboot"
if ! wait_for "[ -b $A ]" 90; then
    for s in $ALL; do want $s && result $s FAIL "xvda (served from the driver domain) did not appear within 90 s"; done
    finish
fi
echo 4096 > /sys/block/xvda/queue/read_ahead_kb
say "DOMU-KV dd-sectors $(cat /sys/block/xvda/size)"

# ---- second boot ----
mark=$(sector_text $MARK_SECT)
case $mark in
BOOT1*)
    say "DOMU-PHASE second-boot"
    want_sha=${mark#BOOT1 }
    got=$(region_sha $A 66 1)
    if [ "$got" != "$want_sha" ]; then
        result reboot FAIL "after the reboot xvda [66,67) MiB has sha $got, before it $want_sha"
    elif w=$(write_region $A 68 1); then
        say "DOMU-KV dd-reboot-wsha $w"
        result reboot PASS "xvda reconnected after the reboot: data written before it intact, wrote+reread 1 MiB"
    else
        result reboot FAIL "after the reboot: write/readback: $w"
    fi
    finish
    ;;
esac

# ---- the hash round trip: the driver domain's data read here, this guest's checked there ----
if want rw; then
    rw_round_trip $A 64 "$(arg pvdd64)" 66 dd-wsha "the driver domain"
fi

# ---- a filesystem on the first 32 MiB; the driver domain fsck's the image afterwards ----
if want fs; then
    t0=$(now)
    why=$(new_ext4 $A 32M)
    if [ -z "$why" ]; then
        mkdir -p /mnt/d
        i=0
        while [ $i -lt 50 ]; do echo "file $i" > /mnt/d/f$i; i=$((i + 1)); done
        dd if=/dev/urandom of=/mnt/big bs=$MiB count=8 conv=fsync 2>/dev/null || why="writing /big failed"
        bigsha=$(sha256sum /mnt/big | cut -d' ' -f1)
        umount /mnt || why="${why:-umount failed}"
        dropcache $A
        if [ -z "$why" ]; then
            mount -t ext4 -o ro $A /mnt || why="remount failed"
            [ -n "$why" ] || [ "$(sha256sum /mnt/big | cut -d' ' -f1)" = "$bigsha" ] || why="/big changed across umount/mount"
            [ -n "$why" ] || [ "$(ls /mnt/d | wc -l)" = 50 ] || why="files missing after remount"
            umount /mnt 2>/dev/null
        fi
        [ -n "$why" ] || e2fsck -fn $A > /tmp/fsck.log 2>&1 || why="e2fsck -fn: $(tail -n 3 /tmp/fsck.log | tr '\n' ' ')"
    fi
    if [ -n "$why" ]; then
        result fs FAIL "$why"
    else
        say "DOMU-KV dd-bigsha $bigsha"
        result fs PASS "mkfs.ext4, 50 files + 8 MiB fsync'ed, umount/mount, e2fsck -fn clean ($(since "$t0") s)"
    fi
fi

# ---- the NIC from the driver domain: dom0 is 198.18.8.1 on the same segment ----
if want net; then
    t0=$(now)
    why=""
    if ! wait_for '[ -n "$(net_if 0)" ]' 60; then
        why="no interface for vif-0 within 60 s"
    else
        NIF=$(net_if 0)
        { ip link set "$NIF" up && ip addr add 198.18.9.2/24 dev "$NIF" && ip route add default via 198.18.9.1; } \
            || why="cannot address $NIF"
        say "DOMU-PHASE dd-net-addr" # dom0 has the driver domain address its end of the tap
    fi
    if [ -z "$why" ]; then
        until_ok 60 ping_ok 198.18.8.1 || why="no echo reply from dom0 (198.18.8.1) within 60 s"
    fi
    if [ -z "$why" ]; then
        ping -c 3 198.18.8.1 > /tmp/ping.out 2>&1
        loss=$(grep -o '[0-9]*% packet loss' /tmp/ping.out)
        [ "$loss" = "0% packet loss" ] || why="ping 198.18.8.1: ${loss:-$(tail -n 1 /tmp/ping.out)}"
    fi
    if [ -z "$why" ]; then
        dd if=/dev/urandom of=/tmp/nup bs=$MiB count=2 2>/dev/null
        say "DOMU-KV dd-net-up $(sha256sum /tmp/nup | cut -d' ' -f1)"
        timeout 120 nc 198.18.8.1 5701 < /tmp/nup > /dev/null 2>/tmp/nc.err || why="nc to dom0:5701: $(head -n 1 /tmp/nc.err)"
        rm -f /tmp/nup
    fi
    if [ -z "$why" ]; then
        echo 2 | timeout 120 nc 198.18.8.1 5702 > /tmp/ndown 2>/tmp/nc.err || why="nc from dom0:5702: $(head -n 1 /tmp/nc.err)"
        got=$(sha256sum /tmp/ndown | cut -d' ' -f1)
        [ -n "$why" ] || [ "$got" = "$(arg pvnet2)" ] || why="received $(wc -c < /tmp/ndown) bytes with sha $got, dom0 sent $(arg pvnet2)"
        rm -f /tmp/ndown
    fi
    if [ -n "$why" ]; then
        result net FAIL "$why"
    else
        result net PASS "$NIF ($(cat /sys/class/net/$NIF/address)) via the driver domain: 3 pings to dom0 ($(tail -n 1 /tmp/ping.out | sed 's/.*= //')), 2 MiB each way over TCP ($(since "$t0") s)"
    fi
fi

# ---- pvback SIGKILLed and restarted in the driver domain while this guest writes and reads ----
if want restart; then
    say "DOMU-PHASE dd-kill"
    t0=$(now)
    i=0
    after=-1
    maxs=0
    why=""
    while :; do
        t1=$(now)
        off=$((40 + 2 * (i % 8)))
        w=$(write_region $A $off 2) || { why="round $i at $off MiB: $w"; break; }
        s=$(since "$t1")
        maxs=$(awk -v a="$maxs" -v b="$s" 'BEGIN { print (b > a) ? b : a }')
        i=$((i + 1))
        dropcache $A
        case $(sector_text $RESTART_SECT) in
        RESTARTED*) [ $after -ge 0 ] || { after=0; say "DOMU-KV dd-restart-seen-round $i"; } ;;
        esac
        if [ $after -ge 0 ]; then
            after=$((after + 1))
            [ $after -le 2 ] || break
        fi
        [ "$(since "$t0" | cut -d. -f1)" -lt 360 ] || { why="no restart seen in 360 s ($i rounds)"; break; }
    done
    if [ -n "$why" ]; then
        result restart FAIL "$why"
    else
        result restart PASS "$i rounds of 2 MiB write+fsync+uncached reread verified across the kill, the slowest ${maxs} s ($(since "$t0") s)"
    fi
fi

if want reboot; then
    w=$(region_sha $A 66 1)
    printf 'BOOT1 %s' "$w" | dd of=$A bs=512 seek=$MARK_SECT conv=sync,fsync 2>/dev/null \
        || { result reboot FAIL "cannot write the boot marker"; finish; }
    say "DOMU-PHASE rebooting"
    sync
    reboot -f
    sleep 60
fi
finish

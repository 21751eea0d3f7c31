# shellcheck shell=sh
# Helpers both guest scripts use (domU-init.sh as /init, domU-dd-init.sh as /init-dd): sourced from the
# guest's initramfs (build.sh puts this file at /guest-lib.sh).  busybox sh.

MiB=1048576
# The kernel filesystems every init needs first (busybox is installed before this file is sourced).
guest_mounts() {
    mount -t proc proc /proc
    mount -t sysfs sys /sys
    mount -t devtmpfs dev /dev
    mount -t tmpfs tmpfs /tmp
}
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | head -n 1; }
say() { echo "$*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# A heartbeat line every 30 s while the steps run, so that dom0 can tell a guest stuck in one step (its
# stall report) from one that no longer runs at all: uptime, what xvda has in flight (reads writes), free memory.
hb_start() {
    ( while sleep 30; do
        say "DOMU-HB $(cut -d' ' -f1 /proc/uptime) xvda-inflight $(tr -s ' ' < /sys/block/xvda/inflight) memfree-kb $(awk '/^MemFree/ {print $2}' /proc/meminfo)"
    done ) &
    HB_PID=$!
}
hb_stop() { [ -z "$HB_PID" ] || kill "$HB_PID" 2>/dev/null; HB_PID=""; }
finish() {
    hb_stop
    sync
    say "DOMU-DONE"
    poweroff -f
    sleep 60
}
# new_ext4 DEV SIZE: a fresh ext4 (Debian's mke2fs.conf) on the first SIZE of DEV, mounted at /mnt; prints why
# and fails if it could not be made or mounted.
new_ext4() {
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$1" "$2" > /tmp/mkfs.log 2>&1 \
        || { echo "mkfs.ext4: $(tail -n 2 /tmp/mkfs.log | tr '\n' ' ')"; return 1; }
    mount -t ext4 "$1" /mnt || { echo "mount after mkfs failed"; return 1; }
}
wait_for() { # wait_for EXPR SECONDS
    i=0
    while ! eval "$1"; do
        i=$((i + 1))
        [ $i -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
    return 0
}
# until_ok SECONDS CMD...: CMD until it succeeds, for at most SECONDS of wall time (CMD itself may take a while)
until_ok() {
    end=$(($(cut -d. -f1 /proc/uptime) + $1))
    shift
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt $end ] || return 1
        sleep 0.5
    done
}
dropcache() { blockdev --flushbufs "$1" 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches; }
# Through a tmpfs file, not a pipe: a pipe costs two context switches per 64 KiB, and in a PV guest under TCG
# each switch is slow enough that `dd | sha256sum` of 64 MiB takes a minute instead of 4 s.
region_sha() { # region_sha DEV OFFSET_MIB COUNT_MIB
    dd if="$1" of=/tmp/r bs=$MiB skip="$2" count="$3" 2>/dev/null
    sha256sum /tmp/r | cut -d' ' -f1
    rm -f /tmp/r
}
# Write COUNT_MIB of fresh random data at OFFSET_MIB of DEV and read it back uncached; prints the sha on success.
write_region() { # write_region DEV OFFSET_MIB COUNT_MIB
    dd if=/dev/urandom of=/tmp/w bs=$MiB count="$3" 2>/dev/null
    want=$(sha256sum /tmp/w | cut -d' ' -f1)
    dd if=/tmp/w of="$1" bs=$MiB seek="$2" conv=fsync 2>/tmp/dd.err || { head -n 1 /tmp/dd.err; rm -f /tmp/w; return 1; }
    rm -f /tmp/w
    dropcache "$1"
    got=$(region_sha "$1" "$2" "$3")
    [ "$got" = "$want" ] || { echo "readback $got != written $want"; return 1; }
    echo "$want"
}
# rw_round_trip DEV READ_MIB WANT WRITE_MIB KV WHO: the `rw` step.  Reads the 1 MiB WHO wrote at READ_MIB (its
# sha WANT), writes fresh 1 MiB at WRITE_MIB and rereads it uncached (its sha goes out as DOMU-KV KV, for WHO to check).
rw_round_trip() {
    t0=$(now)
    got=$(region_sha "$1" "$2" 1)
    if [ "$got" != "$3" ]; then
        result rw FAIL "read of $6's 1 MiB: sha $got, $6 wrote $3"
    elif w=$(write_region "$1" "$4" 1); then
        say "DOMU-KV $5 $w"
        result rw PASS "read $6's 1 MiB, wrote+reread 1 MiB ($(since "$t0") s)"
    else
        result rw FAIL "write/readback: $w"
    fi
}
net_if() { # net_if DEVID: the interface of xen device vif-DEVID, if any
    for n in /sys/class/net/*; do
        [ "$(basename "$(readlink "$n/device" 2>/dev/null)")" = "vif-$1" ] && basename "$n"
    done
}
ping_ok() { ping -c 1 -W 1 "$1" > /dev/null 2>&1; }

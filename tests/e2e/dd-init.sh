#!/bin/sh
# PID 1 of the test's driver domain (#19), a PV domU started with driver_domain=1 whose root disk dom0's pvback
# serves: what an operator's pvback driver domain runs (docs/driver-domain.md), then a small control loop for
# dom0's test driver (tests/e2e/dom0/driver_domain.py).
#
#   xen-gntdev, xen-evtchn, xen-gntalloc, xenfs; xenstore through /dev/xen/xenbus (no xenstored here)
#   `xl devd`: runs the vif hotplug script (vif-pvback) and starts libxl's "QEMU" for qdisk backends, which here is
#              `pvback dm-stub` (contrib/xen/qemu-dm-pvback at libxl's qemu-xen path)
#   `pvback serve --types qdisk,vif`: learns its domid from xenstore, drops to the pvback user
#   routing: this domain's own NIC (eth0, served by dom0's pvback) 198.18.8.3, the guests' taps 198.18.9.1
#
# dom0 talks to it through xenstore, in this domain's own data/ directory (dom0 may write there, this domain owns
# it): dom0 writes data/pvback-e2e/cmd = "<seq> <verb> <args>", this script answers data/pvback-e2e/ack =
# "<seq> ok|fail <detail>".  data/pvback-e2e/state = "ready <details>" (or "fail <why>") once serving.
# Everything else goes to the console (xenconsoled's log in dom0): "DD-STAGE", "DD-LOG" lines.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec > /dev/console 2>&1
now() { cut -d' ' -f1 /proc/uptime; }
say() { echo "$*"; }
say "DD-STAGE init $(now)"

C=data/pvback-e2e # relative: under this domain's own /local/domain/<domid>
IMG=/var/lib/pvback-dd/guest.img
IMG_MIB=96
SERVE_LOG=/var/log/pvback-serve.log
DEVD_LOG=/var/log/xen/xl-devd.log
METRICS=127.0.0.1:9477
: > "$SERVE_LOG"
PV_PID=""
DEVD_PID=""

for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-netfront tun; do
    # The initramfs loaded them already (build-dd.sh): modprobe only what is missing.
    [ -d "/sys/module/$(echo "$m" | tr - _)" ] || modprobe "$m" || say "DD-LOG modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen || say "DD-LOG cannot mount xenfs"
mkdir -p /run/xen /run/pvback /var/log/xen /var/lib/xen /var/lib/pvback-dd
ip link set lo up

fail() {
    say "DD-FAIL $*"
    xenstore-write "$C/state" "fail $*"
    for f in $SERVE_LOG $DEVD_LOG; do [ -f "$f" ] && tail -n 40 "$f" | sed "s|^|DD-LOG $(basename "$f"): |"; done
    sync
    sleep 2
    busybox poweroff -f
}

DOMID=$(xenstore-read domid) || fail "xenstore-read domid (through /dev/xen/xenbus) failed"
say "DD-STAGE xenstore domid=$DOMID $(now)"

# This domain's own NIC (eth0, from dom0's pvback) on 198.18.8.0/24 with dom0; the guests' taps each get
# 198.18.9.1/24 when dom0 asks (`tap DOMID`) and this domain routes between them.  Routed, not bridged: dom0's
# netback drops frames whose source MAC is not the vif's own ([net] check_mac), as it should.
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 198.18.8.3/24 dev eth0 || say "DD-LOG cannot address eth0"
    echo 1 > /proc/sys/net/ipv4/ip_forward
else
    say "DD-LOG no eth0: guests' NICs will have no way out"
fi

# The guest's disk: an image with 1 MiB of random data at 64 MiB, for the hash round trip.
rm -f "$IMG"
truncate -s ${IMG_MIB}M "$IMG"
head -c 1048576 /dev/urandom > /tmp/r
dd if=/tmp/r of="$IMG" bs=1M seek=64 conv=notrunc,fsync 2>/dev/null
SHA64=$(sha256sum /tmp/r | cut -d' ' -f1)
rm -f /tmp/r
chown pvback:pvback "$IMG" # `pvback serve` opens it after dropping to that user

xl devd -F > "$DEVD_LOG" 2>&1 &
DEVD_PID=$!
say "DD-STAGE xl-devd pid=$DEVD_PID $(now)"

# Ready once it logged `msg=serving` (its buses watch and its metrics endpoint listens).  Not a request to the
# endpoint: the static busybox's wget crashes on a name lookup, and python would take seconds to start here.
servings() { grep -c 'msg=serving' "$SERVE_LOG" 2>/dev/null; }
# start_pvback: a new `pvback serve`, ready when it says so (at most 300 s); sets PV_PID, UP_S
start_pvback() {
    t0=$(now)
    n0=$(servings)
    echo "---- start $(now)" >> "$SERVE_LOG"
    pvback serve --platform xen --types qdisk,vif --metrics "$METRICS" >> "$SERVE_LOG" 2>&1 &
    PV_PID=$!
    i=0
    while [ "$(servings)" = "$n0" ]; do
        kill -0 "$PV_PID" 2>/dev/null || return 1
        i=$((i + 1))
        [ $i -le 600 ] || return 1
        sleep 0.5
    done
    UP_S=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
}
start_pvback || fail "pvback serve did not come up"
LEARNED=$(grep -o 'backend_domid=[0-9]*' "$SERVE_LOG" | tail -n 1 | cut -d= -f2)
say "DD-STAGE pvback-serve pid=$PV_PID up=${UP_S}s domid=$LEARNED $(now)"
xenstore-write "$C/img" "$IMG $SHA64" "$C/state" "ready domid=$DOMID learned=${LEARNED:-?} pid=$PV_PID up=$UP_S"

proc_caps() { # proc_caps PID: what the kernel says the process holds
    awk '/^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):/ { gsub(/\t/, " "); printf "%s;", $0 }' "/proc/$1/status"
}
region_sha() { dd if="$IMG" bs=1M skip="$1" count="$2" 2>/dev/null | sha256sum | cut -d' ' -f1; }

# verb ARGS -> sets R (the detail) and returns the verdict
do_cmd() {
    case $1 in
    status)
        R="pid=$PV_PID devd=$DEVD_PID learned=${LEARNED:-?} $(proc_caps "$PV_PID") dropped=$(grep -c 'dropped privileges' "$SERVE_LOG")"
        ;;
    sha)
        R=$(region_sha "$2" "$3")
        ;;
    tap)
        t=vif$2.0
        i=0
        while [ ! -e "/sys/class/net/$t" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        ip addr replace 198.18.9.1/24 dev "$t" 2>/tmp/ip.err && ip link set "$t" up 2>>/tmp/ip.err \
            || { R="cannot address $t: $(head -n 1 /tmp/ip.err)"; return 1; }
        R="$t 198.18.9.1/24 up, forwarding $(cat /proc/sys/net/ipv4/ip_forward)"
        ;;
    kill)
        old=$PV_PID
        t0=$(now)
        kill -KILL "$old" || { R="kill -KILL $old failed"; return 1; }
        wait "$old" 2>/dev/null
        start_pvback || { R="the new pvback serve did not come up: $(tail -n 3 $SERVE_LOG | tr '\n' ' ')"; return 1; }
        down=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
        # Tell the guest (it polls this sector): the new daemon serves its reads of it.
        printf 'RESTARTED %s %s' "$old" "$PV_PID" | dd of="$IMG" bs=512 seek=$((88 * 2048)) conv=sync,notrunc,fsync 2>/dev/null
        R="killed=$old new=$PV_PID down=${down}s up=${UP_S}s"
        ;;
    fsck)
        e2fsck -fn "$IMG" > /tmp/fsck.log 2>&1 || { R="e2fsck -fn: $(tail -n 3 /tmp/fsck.log | tr '\n' ' ')"; return 1; }
        rm -f /tmp/big
        debugfs -R "dump /big /tmp/big" "$IMG" > /dev/null 2>&1 || { R="debugfs dump /big failed"; return 1; }
        R="$(sha256sum /tmp/big | cut -d' ' -f1) $(tail -n 1 /tmp/fsck.log | tr ' ' '_')"
        ;;
    stop)
        kill -TERM "$PV_PID"
        i=0
        while kill -0 "$PV_PID" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        if kill -0 "$PV_PID" 2>/dev/null; then
            kill -KILL "$PV_PID"
            R="pvback serve still running 30 s after SIGTERM"
            return 1
        fi
        wait "$PV_PID"
        R="rc=$? errors=$(grep -c 'level=error\|Traceback' "$SERVE_LOG")"
        ;;
    *)
        R="unknown command $1"
        return 1
        ;;
    esac
    return 0 # not the status of the last command substitution (grep -c of no match is 1)
}

last=""
while :; do
    cmd=$(xenstore-read "$C/cmd" 2>/dev/null)
    if [ -n "$cmd" ] && [ "$cmd" != "$last" ]; then
        last=$cmd
        # shellcheck disable=SC2086 # the command's words
        set -- $cmd
        seq=$1
        shift
        say "DD-CMD $seq $* $(now)"
        if do_cmd "$@"; then verdict=ok; else verdict=fail; fi
        say "DD-ACK $seq $verdict $R"
        xenstore-write "$C/ack" "$seq $verdict $R"
        if [ "$1" = stop ]; then
            kill "$DEVD_PID" 2>/dev/null
            for f in $SERVE_LOG $DEVD_LOG; do tail -n 200 "$f" | sed "s|^|DD-LOG $(basename "$f"): |"; done
            ls /var/log/xen/ | sed 's|^|DD-LOG xen log: |'
            for f in /var/log/xen/qdisk-*.log; do [ -f "$f" ] && sed "s|^|DD-LOG $(basename "$f"): |" "$f"; done
            sync
            sleep 1
            busybox poweroff -f
        fi
    fi
    # A daemon that died on its own is a failure the test must see, not something to paper over.
    if [ -n "$PV_PID" ] && ! kill -0 "$PV_PID" 2>/dev/null; then
        say "DD-LOG pvback serve $PV_PID exited on its own: $(tail -n 5 $SERVE_LOG | tr '\n' ' ')"
        xenstore-write "$C/state" "fail pvback serve exited"
        PV_PID=""
    fi
    sleep 0.3
done

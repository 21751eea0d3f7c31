#!/bin/busybox sh
# /init of the test domU (busybox initramfs).  One guest runs every disk check in turn, so the suite pays for
# one domU boot (plus the reboot it tests) instead of one per check.  Disks, as tests/e2e/dom0/run_tests.py
# attaches them:
#   xvda  rw, created by `xl create` (qdisk):  rw [1,2) MiB read / [2,3) written, discard [8,12),
#         big [64,128) read / [128,192) written, boot marker at 200 MiB
#   xvdb  ro, created by `xl create` (qdisk):  [1,2) read, writes must fail
#   xvdc  hot-plugged while running: `pvback attach` (rw-attach [100,101) read / [101,102) written; an ext4
#         of 96 MiB at the start), `pvback detach`, `xl block-attach` (the files are still there), `xl block-detach`
#   xvdd  rw, created by `xl create` (qdisk) on dm-log-writes in dom0 (pvlw=1): only the flush and fs-replay steps
#         write it: tagged 4 KiB blocks at [28,29) MiB one fsync each, then an ext4 of 16 MiB at the start
#   xvde  rw, `pvback attach`ed by dom0 right after `xl create` and never detached: [1,2) MiB written; dom0
#         checks it goes with the domain (the reboot destroys this domain)
#   vtpm 0 from `xl create` (vtpm=["backend=Domain-0,uuid=..."]), served by pvback + swtpm in dom0: xen-tpmfront
#         gives /dev/tpm0; tpm2-tools through TCTI device:/dev/tpm0 (getrandom, pcrextend, an NV index); the
#         NV value must still be there after the reboot (it rides along in the boot marker), PCR 16 reset
#   eth0  vif 0 from `xl create` (vif=["...,script=vif-pvback"]), served by pvback's netback in dom0 on the tap
#         vif<domid>.0: dom0 198.18.0.1 / fd00::1, the guest .2 / ::2; ping both families, 8 MiB over TCP each
#         way (nc to dom0's servers on ports 5701: the guest sends, 5702: dom0 sends the MiB asked for); after
#         the reboot the new domain's vif passes traffic again (ping, 2 MiB each way)
#   eth1  vif 1 from `xl network-attach` while running (198.18.1.0/24, fd00:1::/64): ping, 2 MiB each way,
#         `xl network-detach`
#   eth2  vif 2 from `xl create` with bridge=pvbr0.10: pvback's port on a private Open vSwitch in dom0 (VLAN 10),
#         whose only peer is a network namespace on that bridge (198.18.2.1, fd00:2::1; the guest .2 / ::2): ping,
#         2 MiB each way, `xl network-detach` (tests/e2e/dom0/ovs_case.py)
# Kernel command line: pvsteps=all|a+b+...  pva/pvbig/pvb/pvc=sha256 of the regions dom0 wrote, pvnet8/pvnet2=
# sha256 of what dom0 sends over TCP when asked for 8 or 2 MiB.
# Console lines (hvc0, logged by xenconsoled in dom0):
#   DOMU-RESULT <check> PASS|FAIL <detail>   the domU's verdict on one check
#   DOMU-KV <key> <value>                     facts dom0 checks against the image files
#   DOMU-KLOG <step> error|info: <line>       the guest kernel's block/fs/net lines (`quiet` keeps them off hvc0)
#   DOMU-TPMLOG <step> error|info: <line>    the guest kernel's tpm lines (probe of xen-tpmfront and after)
#   DOMU-PHASE <name>                         where dom0 has to act (attach, detach...) or synchronises
#   DOMU-HB <uptime> ...                      heartbeat every 30 s (guest-lib.sh hb_start), for dom0's stall report
#   DOMU-DONE                                 last line before poweroff
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
. /guest-lib.sh
guest_mounts
STEPS=$(arg pvsteps)
A=/dev/xvda
B=/dev/xvdb
C=/dev/xvdc
D=/dev/xvdd
E=/dev/xvde
LW_ROUNDS=8
LW_TAG_BLK=$((28 * 256)) # 4 KiB blocks: 28 MiB into xvdd, past the 16 MiB ext4 of the fs-replay step
LW_FILES=6
# Each wait for dom0 is bounded; dom0's own waits are longer, so the guest is the one that gives up first.
HOTPLUG_WAIT=150

want() { [ -z "$STEPS" ] || [ "$STEPS" = all ] || case "+$STEPS+" in *"+$1+"*) true ;; *) false ;; esac; }

# The guest kernel's side of every check.  blkfront says what went wrong at KERN_WARNING/INFO (e.g. "xvda: empty
# flush op failed", after which it turns flush off for good and the disk becomes write-through, while the
# fsync that triggered it still returns 0): `quiet` keeps that off the console, so read dmesg after each step.
KLOG_ERRORS=0
KLOG_FIRST=""
WROTE=""      # disks the guest wrote: their write cache must stay "write back" (flush still on) ...
STEP_WROTE="" # ... checked at the end of the step that wrote them and, for all of them, in the klog step
wrote() { # wrote DEV...: this step writes these disks
    WROTE="$WROTE $*"
    STEP_WROTE="$STEP_WROTE $*"
}
klog_scan() { # klog_scan STEP: report new block/fs kernel lines; false if one is an error
    dmesg -c > /tmp/klog 2>/dev/null || { say "DOMU-KLOG $1 error: cannot read dmesg"; return 1; }
    cat /tmp/klog >> /tmp/klog.all # every line of this boot, for the vTPM steps' tpm lines
    grep -E 'blkfront|op failed|barrier or flush|I/O error|blk_update_request|EXT4-fs error|wrong operation|disabled for further use|Kernel panic|BUG:|Oops|netfront|netback|xennet' \
        /tmp/klog > /tmp/klog.rel
    bad=0
    while IFS= read -r line; do
        case $line in
        *"op failed"* | *"I/O error"* | *blk_update_request* | *"EXT4-fs error"* | *"response has wrong operation"* | \
            *"disabled for further use"* | *"Kernel panic"* | *"BUG:"* | *Oops*) kind=error ;;
        *"barrier or flush: disabled"*)
            # blkfront's connect line for a disk the backend offers no flush on: right for a read-only one.
            dev=${line#*blkfront: }
            dev=${dev%%:*}
            if [ "$(cat "/sys/block/$dev/ro" 2>/dev/null)" = 1 ]; then kind=info; else kind=error; fi
            ;;
        *netfront* | *netback* | *xennet*)
            # xen-netfront's complaints about what the backend did (bad rx responses, missing extras, too many
            # slots, a backend that offers too little) and its own failures; its banner is info.
            case $line in
            *rror* | *fail* | *Fail* | *nvalid* | *issing* | *"Too many"* | *"too many"* | *rocket* | *WARN* | *[Bb]ad\ *) kind=error ;;
            *) kind=info ;;
            esac
            ;;
        *) kind=info ;;
        esac
        say "DOMU-KLOG $1 $kind: $line"
        if [ $kind = error ]; then
            [ -n "$KLOG_FIRST" ] || KLOG_FIRST=$line
            [ $bad = 1 ] || step_first=$line
            bad=1
            KLOG_ERRORS=$((KLOG_ERRORS + 1))
        fi
    done < /tmp/klog.rel
    return $bad
}
write_cache_problem() { # write_cache_problem DEV...: prints the first whose write cache is no longer "write back"
    for d in "$@"; do
        [ -e "/sys/block/$d/queue/write_cache" ] || continue
        read -r wc < "/sys/block/$d/queue/write_cache"
        [ "$wc" = "write back" ] || { echo "$d write cache is now '$wc' (blkfront turned flush off)"; return; }
    done
}
# result STEP PASS|FAIL DETAIL: a PASS becomes a FAIL on a kernel error line since the last step, or when a disk
# the step wrote lost its write cache.
result() {
    step=$1 verdict=$2
    shift 2
    detail=$*
    if ! klog_scan "$step"; then
        [ "$verdict" = PASS ] && detail="guest kernel: $step_first (the step itself passed: $detail)"
        verdict=FAIL
    fi
    # shellcheck disable=SC2086 # a list of disk names
    wc=$(write_cache_problem $STEP_WROTE)
    STEP_WROTE=""
    if [ -n "$wc" ] && [ "$verdict" = PASS ]; then
        verdict=FAIL
        detail="$wc (the step itself passed: $detail)"
    fi
    say "DOMU-RESULT $step $verdict $detail"
}
flushes() { # flush requests completed on disk $1 (field 16 of /sys/block/X/stat, Linux >= 5.5)
    read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ f _ < "/sys/block/$1/stat"
    echo "${f:-?}"
}

# mkfs.ext4 on the first 96 MiB of xvdc, files, umount, remount, fsck; prints why on failure.
fs_check() {
    new_ext4 $C 96M || return 1
    mkdir -p /mnt/d
    i=0
    while [ $i -lt 100 ]; do echo "file $i" > /mnt/d/f$i; i=$((i + 1)); done
    dd if=/dev/urandom of=/mnt/big bs=$MiB count=8 conv=fsync 2>/dev/null \
        || { echo "writing /big with fsync failed"; umount /mnt; return 1; }
    sha256sum /mnt/big | cut -d' ' -f1 > /tmp/bigsha
    sync
    umount /mnt || { echo "umount failed"; return 1; }
    dropcache $C
    mount -t ext4 -o ro $C /mnt || { echo "remount failed"; return 1; }
    got=$(sha256sum /mnt/big | cut -d' ' -f1)
    n=$(ls /mnt/d | wc -l)
    umount /mnt
    [ "$got" = "$(cat /tmp/bigsha)" ] || { echo "8 MiB file changed across umount/mount: $got"; return 1; }
    [ "$n" = 100 ] || { echo "expected 100 files, found $n"; return 1; }
    e2fsck -fn $C > /tmp/fsck.log 2>&1 || { echo "e2fsck -fn: $(tail -n 3 /tmp/fsck.log | tr '\n' ' ')"; return 1; }
}

# ---- vTPM: xen-tpmfront's /dev/tpm0, tpm2-tools through TCTI device:/dev/tpm0 ----
TPM=/dev/tpm0
NV_INDEX=0x1500016
PCR=16 # the debug PCR: resettable, zero after each TPM Startup(CLEAR), i.e. after each guest boot
export TPM2TOOLS_TCTI=device:$TPM
TPM_SEEN=0
tpm_klog() { # tpm_klog STEP: report the kernel's tpm lines not reported yet; false if one is an error
    dmesg -c >> /tmp/klog.all 2>/dev/null
    grep -iE 'tpm|xen_tpmfront|vtpm' /tmp/klog.all | grep -v 'pvsteps=' > /tmp/tpmlog
    bad=0
    n=0
    while IFS= read -r line; do
        n=$((n + 1))
        [ $n -le $TPM_SEEN ] && continue
        case $line in
        *rror* | *fail* | *Fail* | *imeout* | *"timed out"* | *WARNING* | *"Call Trace"* | *BUG:* | *Oops*) kind=error ;;
        *) kind=info ;;
        esac
        say "DOMU-TPMLOG $1 $kind: $line"
        if [ $kind = error ]; then
            [ $bad = 1 ] || tpm_first=$line
            bad=1
        fi
    done < /tmp/tpmlog
    TPM_SEEN=$n
    return $bad
}
tpm_result() { # tpm_result STEP PASS|FAIL DETAIL: a PASS becomes a FAIL on a tpm error line in the kernel log
    step=$1 verdict=$2
    shift 2
    detail=$*
    if ! tpm_klog "$step"; then
        [ "$verdict" = PASS ] && detail="guest kernel: $tpm_first (the step itself passed: $detail)"
        verdict=FAIL
    fi
    result "$step" "$verdict" "$detail"
}
hex2bin() { printf "$(echo "$1" | sed 's/../\\x&/g')"; }
pcr_hex() { # the sha256 bank's PCR $PCR as 64 hex digits
    tpm2_pcrread "sha256:$PCR" -o /tmp/pcr.bin > /dev/null 2>/tmp/tpm.err || return 1
    od -An -tx1 -v /tmp/pcr.bin | tr -d ' \n'
}
tpm_wait() { # /dev/tpm0 there, or why not
    if ! wait_for "[ -c $TPM ]" 60; then
        WHY="$TPM did not appear within 60 s (xen-tpmfront loaded: $(grep -c xen_tpmfront /proc/modules); device/vtpm: $(ls /sys/bus/xen/devices 2>/dev/null | tr '\n' ' '))"
        return 1
    fi
    major=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null || echo '?')
    say "DOMU-KV tpm-major $major"
    [ -e /dev/tpmrm0 ] && say "DOMU-KV tpm-rm present" || say "DOMU-KV tpm-rm absent"
}
tpm_nvread() { # the NV index's 32 bytes as hex
    tpm2_nvread $NV_INDEX -C o -s 32 -o /tmp/nv.out > /dev/null 2>/tmp/tpm.err || return 1
    od -An -tx1 -v /tmp/nv.out | tr -d ' \n'
}
# tpm_tools: the first boot's check; sets NV on success, WHY on failure
tpm_tools() {
    tpm_wait || return 1
    rnd=$(tpm2_getrandom 16 --hex 2>/tmp/tpm.err) || { WHY="tpm2_getrandom: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    [ ${#rnd} = 32 ] || { WHY="tpm2_getrandom 16 --hex gave '$rnd'"; return 1; }
    say "DOMU-KV tpm-random $rnd"
    before=$(pcr_hex) || { WHY="tpm2_pcrread: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    digest=$(echo "pvback e2e $rnd" | sha256sum | cut -d' ' -f1)
    tpm2_pcrextend "$PCR:sha256=$digest" 2>/tmp/tpm.err || { WHY="tpm2_pcrextend: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    after=$(pcr_hex) || { WHY="tpm2_pcrread after extend: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    want=$({ hex2bin "$before"; hex2bin "$digest"; } | sha256sum | cut -d' ' -f1)
    [ "$after" = "$want" ] || { WHY="PCR $PCR after extend is $after, want sha256($before || $digest) = $want"; return 1; }
    say "DOMU-KV tpm-pcr $after"
    # The NV index: defined once per vTPM (a rerun on a kept state finds it defined), written with a fresh value.
    # (tpm2_getcap, not tpm2_nvreadpublic: tpm2-tools 5.4's nvreadpublic of a missing index segfaults.)
    if ! tpm2_getcap handles-nv-index 2>/dev/null | grep -qi "$NV_INDEX"; then
        tpm2_nvdefine $NV_INDEX -C o -s 32 -a "ownerread|ownerwrite" > /dev/null 2>/tmp/tpm.err \
            || { WHY="tpm2_nvdefine: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    fi
    head -c 32 /dev/urandom > /tmp/nv.in
    nv=$(od -An -tx1 -v /tmp/nv.in | tr -d ' \n')
    tpm2_nvwrite $NV_INDEX -C o -i /tmp/nv.in 2>/tmp/tpm.err || { WHY="tpm2_nvwrite: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    got=$(tpm_nvread) || { WHY="tpm2_nvread: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    [ "$got" = "$nv" ] || { WHY="NV index $NV_INDEX reads $got, wrote $nv"; return 1; }
    say "DOMU-KV tpm-nv $nv"
    NV=$nv
}
# tpm_after_reboot NV: the second boot's check; sets WHY on failure
tpm_after_reboot() {
    tpm_wait || return 1
    got=$(tpm_nvread) || { WHY="tpm2_nvread after reboot: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    say "DOMU-KV tpm-nv-after $got"
    [ "$got" = "$1" ] || { WHY="NV index $NV_INDEX reads $got after the reboot, the first boot wrote $1"; return 1; }
    pcr=$(pcr_hex) || { WHY="tpm2_pcrread after reboot: $(tail -n 2 /tmp/tpm.err | tr '\n' ' ')"; return 1; }
    zero=0000000000000000000000000000000000000000000000000000000000000000
    [ "$pcr" = "$zero" ] || { WHY="PCR $PCR is $pcr after the reboot: the TPM was not reset"; return 1; }
}

# ---- NICs: xen-netfront against pvback's netback; dom0 addresses its tap when the guest says net-addr-* ----
NET_STEPS="net-ping net-tcp net-attach net-reboot net-ovs"
NET_PORT_UP=5701   # the guest sends to dom0, which hashes what it got
NET_PORT_DOWN=5702 # dom0 sends the MiB the guest asks for (a line "N"), whose sha256 dom0 gave as pvnetN
# net_up DEVID V4 V6: the interface is there, up, addressed (sets NIF); WHY on failure
net_up() {
    if ! wait_for "[ -n \"\$(net_if $1)\" ]" 60; then
        WHY="no interface for vif-$1 within 60 s (xen devices: $(ls /sys/bus/xen/devices | tr '\n' ' '); netfront loaded: $(grep -c xen_netfront /proc/modules))"
        return 1
    fi
    NIF=$(net_if "$1")
    # No duplicate address detection (busybox ip has no `nodad`): the address is usable at once.
    echo 0 > "/proc/sys/net/ipv6/conf/$NIF/accept_dad"
    { ip link set "$NIF" up && ip addr add "$2/24" dev "$NIF" && ip -6 addr add "$3/64" dev "$NIF"; } 2>/tmp/ip.err \
        || { WHY="cannot address $NIF: $(head -n 1 /tmp/ip.err)"; return 1; }
    say "DOMU-KV net-if-$1 $NIF $(cat "/sys/class/net/$NIF/address") mtu=$(cat "/sys/class/net/$NIF/mtu")"
}
ping6_ok() { ping6 -c 1 -W 1 "$1" > /dev/null 2>&1; }
# net_ping V4 V6: first reply within 60 s (dom0 addresses its tap meanwhile), then 3 each with no loss
net_ping() {
    until_ok 60 ping_ok "$1" || { WHY="no IPv4 echo reply from $1 within 60 s"; return 1; }
    until_ok 20 ping6_ok "$2" || { WHY="IPv4 works, but no IPv6 echo reply from $2 within 20 s"; return 1; }
    ping -c 3 "$1" > /tmp/ping.out 2>&1 || true
    ping6 -c 3 "$2" > /tmp/ping6.out 2>&1 || true
    l4=$(grep -o '[0-9]*% packet loss' /tmp/ping.out)
    l6=$(grep -o '[0-9]*% packet loss' /tmp/ping6.out)
    [ "$l4" = "0% packet loss" ] || { WHY="ping $1: ${l4:-$(tail -n 1 /tmp/ping.out)}"; return 1; }
    [ "$l6" = "0% packet loss" ] || { WHY="ping6 $2: ${l6:-$(tail -n 1 /tmp/ping6.out)}"; return 1; }
    PINGS="v4 $(tail -n 1 /tmp/ping.out | sed 's/.*= //'), v6 $(tail -n 1 /tmp/ping6.out | sed 's/.*= //')"
}
# net_tcp PEER TAG MIB: MIB to dom0 (its sha as DOMU-KV net-up-TAG, dom0 compares) and MIB from dom0 (compared
# with pvnetMIB here); sets TCP (timings) or WHY
net_tcp() {
    dd if=/dev/urandom of=/tmp/nup bs=$MiB count="$3" 2>/dev/null
    say "DOMU-KV net-up-$2 $(sha256sum /tmp/nup | cut -d' ' -f1)"
    t0=$(now)
    timeout 120 nc "$1" $NET_PORT_UP < /tmp/nup > /dev/null 2>/tmp/nc.err \
        || { WHY="nc to $1:$NET_PORT_UP failed: $(head -n 1 /tmp/nc.err)"; rm -f /tmp/nup; return 1; }
    t_up=$(since "$t0")
    rm -f /tmp/nup
    t0=$(now)
    echo "$3" | timeout 120 nc "$1" $NET_PORT_DOWN > /tmp/ndown 2>/tmp/nc.err \
        || { WHY="nc from $1:$NET_PORT_DOWN failed: $(head -n 1 /tmp/nc.err)"; rm -f /tmp/ndown; return 1; }
    t_down=$(since "$t0")
    got=$(sha256sum /tmp/ndown | cut -d' ' -f1)
    n=$(wc -c < /tmp/ndown)
    rm -f /tmp/ndown
    [ "$got" = "$(arg "pvnet$3")" ] || { WHY="received $n bytes from dom0 with sha $got, dom0 sent $(arg "pvnet$3")"; return 1; }
    TCP="$3 MiB up in $t_up s, $3 MiB down in $t_down s (sha256 checked)"
}

say "DOMU-PHASE init $(uname -r)"
result boot PASS "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vcpu, /init at $(now) s"

# Modules in dependency order (build.sh wrote the list).
while read -r m; do
    [ -n "$m" ] && insmod "/lib/modules/$m" 2>/dev/null
done < /lib/modules/order
say "DOMU-PHASE modules"

if ! wait_for "[ -b $A ] && [ -b $B ]" 60; then
    why="xvda/xvdb did not appear within 60 s of loading xen-blkfront (present: $(ls /sys/block | tr '\n' ' '))"
    for c in rw big discard ro flush fs-replay gone rw-attach fs hotplug klog reboot tpm tpm-reboot $NET_STEPS; do result $c FAIL "$why"; done
    finish
fi
# Linux reads a block device through the page cache in read_ahead_kb pieces (128 KiB): one request in flight
# at a time, and under TCG each round trip costs tens of ms.  Ask for up to 4 MiB, as a real workload would.
for q in /sys/block/xvd*/queue/read_ahead_kb; do echo 4096 > "$q"; done
hb_start
klog_scan connect || true # blkfront's connect lines: what each disk negotiated (flush, persistent, indirect)
say "DOMU-KV sectors-a $(cat /sys/block/xvda/size)"
say "DOMU-KV ro-b $(cat /sys/block/xvdb/ro)"

# ---- second boot: the reboot check ----
mark=$(dd if=$A bs=512 skip=$((200 * 2048)) count=1 2>/dev/null | tr -d '\0' | head -c 160)
case $mark in
BOOT1*)
    say "DOMU-PHASE second-boot"
    want_sha=${mark#BOOT1 }
    want_nv=${want_sha#* }
    want_sha=${want_sha%% *}
    if want tpm-reboot; then
        if [ "$want_nv" = "$want_sha" ] || [ "$want_nv" = none ]; then
            result tpm-reboot FAIL "the first boot wrote no NV value (its tpm step failed)"
        elif tpm_after_reboot "$want_nv"; then
            tpm_result tpm-reboot PASS "after the reboot /dev/tpm0 (tpm_version_major $major) reads the NV value the first boot wrote, PCR $PCR back to zero"
        else
            tpm_result tpm-reboot FAIL "$WHY"
        fi
    fi
    if want net-reboot; then
        if ! net_up 0 198.18.0.2 fd00::2; then
            result net-reboot FAIL "after the reboot: $WHY"
        else
            say "DOMU-PHASE net-addr-b2-0"
            if net_ping 198.18.0.1 fd00::1 && net_tcp 198.18.0.1 b2-0 2; then
                result net-reboot PASS "after the reboot $NIF of the new domain: pings $PINGS, $TCP"
            else
                result net-reboot FAIL "after the reboot: $WHY"
            fi
        fi
    fi
    got=$(region_sha $A 2 1)
    if [ "$got" != "$want_sha" ]; then
        result reboot FAIL "after reboot xvda [2,3) MiB has sha $got, before the reboot it was $want_sha"
    elif [ "$(region_sha $B 1 1)" != "$(arg pvb)" ]; then
        result reboot FAIL "after reboot the read-only xvdb no longer reads what dom0 wrote"
    else
        result reboot PASS "both disks reconnected after reboot, data written before it is there"
    fi
    # dom0 checks the vTPM's backend (Connected, swtpm running, commands counted) when it reads the
    # tpm-reboot result, and powering off closes the device under it: stay up while it looks (it has no
    # way to tell us it is done; each of its checks takes a second or two under TCG).
    want tpm-reboot && sleep 15
    finish
    ;;
BOOT0*) ;;
*)
    for c in rw big discard ro flush fs-replay gone rw-attach fs hotplug klog reboot tpm tpm-reboot $NET_STEPS; do
        result $c FAIL "unexpected boot marker '$mark'"
    done
    finish
    ;;
esac

# ---- the vTPM, first boot ----
NV=none
if want tpm; then
    t0=$(now)
    if tpm_tools; then
        tpm_result tpm PASS "/dev/tpm0 (tpm_version_major $major): tpm2_getrandom, tpm2_pcrextend (PCR $PCR as computed), NV index $NV_INDEX define/write/read through TCTI device:$TPM ($(since "$t0") s)"
    else
        tpm_result tpm FAIL "$WHY"
    fi
fi

# ---- NICs, first boot: eth0 from xl create, then eth1 attached and detached while running ----
if want net-ping || want net-tcp || want net-reboot; then
    if ! net_up 0 198.18.0.2 fd00::2; then
        for c in net-ping net-tcp; do want $c && result $c FAIL "$WHY"; done
    else
        say "DOMU-PHASE net-addr-0"
        ethtool -k "$NIF" 2>/dev/null | grep -E '^(rx-checksumming|tx-checksumming|scatter-gather|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload):' \
            | sed 's/: /=/; s/ .*//' | tr '\n' ' ' > /tmp/offl
        say "DOMU-KV net-offloads $(tr ' ' ',' < /tmp/offl | sed 's/,$//')"
        say "DOMU-KV net-queues $(ls -d /sys/class/net/$NIF/queues/tx-* | wc -l)"
        if want net-ping; then
            if net_ping 198.18.0.1 fd00::1; then
                result net-ping PASS "$NIF ($(cat /sys/class/net/$NIF/address)) <-> dom0 over pvback's vif: 3+3 pings, rtt min/avg/max $PINGS"
            else
                result net-ping FAIL "$WHY"
            fi
        fi
        if want net-tcp; then
            if until_ok 60 ping_ok 198.18.0.1 && net_tcp 198.18.0.1 b1-0 8; then
                result net-tcp PASS "$TCP; offloads $(cat /tmp/offl)"
            else
                result net-tcp FAIL "${WHY:-no IPv4 echo reply from dom0 within 60 s}"
            fi
        fi
    fi
fi
if want net-attach; then
    say "DOMU-PHASE want-vif1"
    t0=$(now)
    if ! net_up 1 198.18.1.2 fd00:1::2; then
        say "DOMU-PHASE release-vif1" # whatever came of the attach: it must not outlive this step (nor the reboot)
        result net-attach FAIL "after xl network-attach: $WHY"
    else
        t_att=$(since "$t0")
        say "DOMU-PHASE net-addr-1"
        if net_ping 198.18.1.1 fd00:1::1 && net_tcp 198.18.1.1 b1-1 2; then
            nif1=$NIF
            say "DOMU-PHASE release-vif1"
            t0=$(now)
            if wait_for '[ -z "$(net_if 1)" ]' 60; then
                result net-attach PASS "$nif1 up $t_att s after asking, pings $PINGS, $TCP; gone $(since "$t0") s after asking for the detach"
            else
                result net-attach FAIL "$nif1 still present 60 s after asking dom0 to xl network-detach it"
            fi
        else
            say "DOMU-PHASE release-vif1"
            result net-attach FAIL "$WHY"
        fi
    fi
fi

# ---- eth2: vif 2 from xl create, an OVS port in dom0; its peer is a namespace on the bridge, not dom0 ----
if want net-ovs; then
    t0=$(now)
    if ! net_up 2 198.18.2.2 fd00:2::2; then
        say "DOMU-PHASE release-vif2"
        result net-ovs FAIL "vif 2 (bridge=pvbr0.10): $WHY"
    else
        say "DOMU-PHASE ovs-up"
        if net_ping 198.18.2.1 fd00:2::1 && net_tcp 198.18.2.1 ovs 2; then
            nif2=$NIF
            say "DOMU-PHASE release-vif2"
            t0=$(now)
            if wait_for '[ -z "$(net_if 2)" ]' $HOTPLUG_WAIT; then
                result net-ovs PASS "$nif2 (vif 2, bridge=pvbr0.10) <-> the peer namespace through OVS: pings $PINGS, $TCP; gone $(since "$t0") s after asking for the detach"
            else
                result net-ovs FAIL "$nif2 still present $HOTPLUG_WAIT s after asking dom0 to xl network-detach it"
            fi
        else
            say "DOMU-PHASE release-vif2"
            result net-ovs FAIL "vif 2 (bridge=pvbr0.10): $WHY"
        fi
    fi
fi

# ---- xvda: read/write, 64 MiB, discard ----
if want rw; then
    wrote xvda
    rw_round_trip $A 1 "$(arg pva)" 2 rw-wsha dom0
fi

if want big; then
    wrote xvda
    t0=$(now)
    got=$(region_sha $A 64 64)
    t_read=$(since "$t0")
    t1=$(now)
    if [ "$got" != "$(arg pvbig)" ]; then
        result big FAIL "64 MiB read: sha $got, dom0 wrote $(arg pvbig)"
    elif w=$(write_region $A 128 64); then
        say "DOMU-KV big-wsha $w"
        result big PASS "64 MiB read+sha256 in $t_read s, 64 MiB write+reread+sha256 in $(since "$t1") s"
    else
        result big FAIL "64 MiB write/readback: $w"
    fi
fi

if want discard; then
    wrote xvda
    if ! w=$(write_region $A 8 4); then
        result discard FAIL "write before discard: $w"
    elif ! blkdiscard -o $((8 * MiB)) -l $((4 * MiB)) $A 2>/tmp/bd.err; then
        result discard FAIL "blkdiscard: $(head -n 1 /tmp/bd.err) (discard_max_bytes=$(cat /sys/block/xvda/queue/discard_max_bytes))"
    else
        dropcache $A
        z=$(region_sha /dev/zero 0 4)
        [ "$(region_sha $A 8 4)" = "$z" ] && say "DOMU-KV discard-zeroed yes" || say "DOMU-KV discard-zeroed no"
        result discard PASS "blkdiscard of 4 MiB accepted (discard_max_bytes=$(cat /sys/block/xvda/queue/discard_max_bytes))"
    fi
fi

# ---- xvdb: read-only ----
if want ro; then
    if [ "$(cat /sys/block/xvdb/ro)" != 1 ]; then
        result ro FAIL "disk attached read-only but /sys/block/xvdb/ro is not 1"
    elif [ "$(region_sha $B 1 1)" != "$(arg pvb)" ]; then
        result ro FAIL "read: sha $(region_sha $B 1 1), dom0 wrote $(arg pvb)"
    elif dd if=/dev/zero of=$B bs=4096 count=1 seek=256 conv=fsync 2>/tmp/dd.err; then
        result ro FAIL "a write to the read-only disk succeeded"
    else
        result ro PASS "reads work, write refused: $(head -n 1 /tmp/dd.err)"
    fi
fi

# ---- xvdd (dm-log-writes in dom0): fsync rounds, then a journalled ext4 ----
lw_ready() { # lw_ready STEP: xvdd is there and dom0 logs its writes
    if [ "$(arg pvlw)" != 1 ]; then
        result "$1" FAIL "dom0 could not put dm-log-writes under xvdd (its RESULT line says why)"
    elif ! wait_for "[ -b $D ]" 30; then
        result "$1" FAIL "xvdd (from xl create) is not there (present: $(ls /sys/block | tr '\n' ' '))"
    else
        return 0
    fi
    return 1
}
if want flush && lw_ready flush; then
    # Round i writes a tagged block and fsyncs it (dd opens the disk buffered, so the fsync writes the page
    # and then asks blkfront for a flush); round i+1 starts only once that returned.  dom0 replays the log to
    # each flush: the tag of every round whose fsync had returned must be on the disk by then.
    wrote xvdd
    t0=$(now)
    seed=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
    say "DOMU-KV lw-seed $seed"
    base=$(flushes xvdd)
    counts=""
    why=""
    i=0
    while [ $i -lt $LW_ROUNDS ]; do
        printf 'PVBACK-LW-TAG %02d %s\n' $i "$seed" \
            | dd of=$D bs=4096 seek=$((LW_TAG_BLK + i)) conv=sync,fsync 2>/tmp/dd.err \
            || { why="round $i: $(head -n 1 /tmp/dd.err)"; break; }
        counts="$counts${counts:+,}$(($(flushes xvdd) - base))"
        i=$((i + 1))
    done
    # The end of the rounds, for dom0's reading of the log: written without fsync, it reaches the disk when dd
    # closes it (the last close writes the page cache back), after the last round's flush and before mkfs's.
    printf 'PVBACK-LW-END %s\n' "$seed" | dd of=$D bs=4096 seek=$((LW_TAG_BLK + LW_ROUNDS)) conv=sync 2>/dev/null
    say "DOMU-KV lw-flushes $counts"
    n=${counts##*,}
    if [ -n "$why" ]; then
        result flush FAIL "tagged write + fsync on xvdd: $why"
    elif [ "${n:-0}" -lt $LW_ROUNDS ]; then
        result flush FAIL "$LW_ROUNDS fsyncs on xvdd completed only ${n:-0} flushes (write cache: $(cat /sys/block/xvdd/queue/write_cache))"
    else
        result flush PASS "$LW_ROUNDS rounds of a tagged 4 KiB write + fsync on xvdd, $n flushes completed ($(since "$t0") s)"
    fi
fi

if want fs-replay && lw_ready fs-replay; then
    wrote xvdd
    t0=$(now)
    why=$(new_ext4 $D 16M)
    if [ -z "$why" ]; then
        # One file after the other, each fsync'ed (a jbd2 commit: flush + FUA, which blkfront sends as flushes)
        # before the next is started; dom0 finds at every flush a clean fs holding a prefix of them.
        i=0
        while [ $i -lt $LW_FILES ]; do
            dd if=/dev/urandom of=/tmp/f bs=4096 count=$((4 + 3 * i)) 2>/dev/null
            say "DOMU-KV lwfs-$i $(sha256sum /tmp/f | cut -d' ' -f1)"
            dd if=/tmp/f of=/mnt/f$i bs=4096 conv=fsync 2>/tmp/dd.err || { why="f$i: $(head -n 1 /tmp/dd.err)"; break; }
            i=$((i + 1))
        done
        rm -f /tmp/f
        umount /mnt || why="${why:-umount failed}"
    fi
    if [ -n "$why" ]; then
        result fs-replay FAIL "$why"
    else
        result fs-replay PASS "mkfs.ext4 (journal) on xvdd, $LW_FILES files each fsync'ed, umount ($(since "$t0") s)"
    fi
fi

# ---- xvde: dom0's `pvback attach` right after xl create, never detached ----
if want gone; then
    if ! wait_for "[ -b $E ]" $HOTPLUG_WAIT; then
        result gone FAIL "xvde (pvback attach right after xl create) is not there after $HOTPLUG_WAIT s"
    elif wrote xvde && w=$(write_region $E 1 1); then
        say "DOMU-KV gone-wsha $w"
        result gone PASS "xvde (pvback attach, never detached): wrote+reread 1 MiB"
    else
        result gone FAIL "xvde write/readback: $w"
    fi
fi

# ---- xvdc: attached while running, filesystem, detached and re-attached ----
if want rw-attach || want fs || want hotplug; then
    say "DOMU-PHASE want-xvdc"
    t0=$(now)
    if ! wait_for "[ -b $C ]" $HOTPLUG_WAIT; then
        for c in rw-attach fs hotplug; do result $c FAIL "xvdc did not appear within $HOTPLUG_WAIT s of asking dom0 to attach it"; done
    else
        say "DOMU-KV attach-s $(since "$t0")"
        echo 4096 > /sys/block/xvdc/queue/read_ahead_kb
        wrote xvdc
        got=$(region_sha $C 100 1)
        if [ "$got" != "$(arg pvc)" ]; then
            result rw-attach FAIL "read of dom0's 1 MiB: sha $got, dom0 wrote $(arg pvc)"
        elif w=$(write_region $C 101 1); then
            say "DOMU-KV attach-wsha $w"
            result rw-attach PASS "xvdc appeared $(since "$t0") s after asking; read dom0's 1 MiB, wrote+reread 1 MiB"
        else
            result rw-attach FAIL "write/readback: $w"
        fi

        fs_ok=0
        t0=$(now)
        if why=$(fs_check); then
            fs_ok=1
            bigsha=$(cat /tmp/bigsha)
            say "DOMU-KV fs-bigsha $bigsha"
            result fs PASS "mkfs.ext4 (Debian mke2fs.conf), 100 files + 8 MiB fsync'ed, umount/mount, e2fsck -fn clean ($(since "$t0") s)"
        else
            result fs FAIL "$why"
        fi

        # dom0 detaches (pvback detach), checks the filesystem in the image, re-attaches (xl block-attach).
        say "DOMU-PHASE release-xvdc"
        if ! wait_for "[ ! -b $C ]" $HOTPLUG_WAIT; then
            result hotplug FAIL "xvdc still present $HOTPLUG_WAIT s after asking dom0 to detach it"
        else
            say "DOMU-PHASE xvdc-gone"
            if ! wait_for "[ -b $C ]" $HOTPLUG_WAIT; then
                result hotplug FAIL "xvdc did not come back within $HOTPLUG_WAIT s of being detached"
            else
                ok=1
                if [ $fs_ok = 1 ]; then
                    if mount -t ext4 -o ro $C /mnt; then
                        [ "$(sha256sum /mnt/big | cut -d' ' -f1)" = "$bigsha" ] || ok="the 8 MiB file differs after re-attach"
                        [ "$(ls /mnt/d | wc -l)" = 100 ] || ok="files missing after re-attach"
                        umount /mnt
                    else
                        ok="the filesystem does not mount after re-attach"
                    fi
                fi
                [ "$(region_sha $C 100 1)" = "$(arg pvc)" ] || ok="dom0's 1 MiB reads differently after re-attach"
                say "DOMU-PHASE xvdc-checked"
                if [ "$ok" != 1 ]; then
                    result hotplug FAIL "$ok"
                elif ! wait_for "[ ! -b $C ]" $HOTPLUG_WAIT; then
                    result hotplug FAIL "xvdc still present $HOTPLUG_WAIT s after the second detach (xl block-detach)"
                else
                    result hotplug PASS "pvback attach/detach, xl block-attach/detach while running, data intact"
                fi
            fi
        fi
    fi
fi

# ---- the whole first boot's kernel log, and the write cache of every disk written ----
if want klog; then
    klog_scan klog || true
    wcs=""
    for d in $(echo $WROTE | tr ' ' '\n' | sort -u); do
        [ -e "/sys/block/$d/queue/write_cache" ] && wcs="$wcs $d=$(tr ' ' - < "/sys/block/$d/queue/write_cache")"
    done
    # shellcheck disable=SC2086 # a list of disk names
    wcp=$(write_cache_problem $WROTE)
    if [ $KLOG_ERRORS -gt 0 ]; then
        result klog FAIL "$KLOG_ERRORS block/fs/net error lines in the guest kernel log, the first: $KLOG_FIRST"
    elif [ -n "$wcp" ]; then
        result klog FAIL "$wcp"
    else
        result klog PASS "no block/fs/net error in the guest kernel log; write cache of the disks written:${wcs:- none}"
    fi
fi

# ---- reboot: the marker carries the sha of xvda [2,3) MiB to the next boot ----
if want reboot || want net-reboot; then
    w=$(region_sha $A 2 1)
    printf 'BOOT1 %s %s' "$w" "$NV" | dd of=$A bs=512 seek=$((200 * 2048)) conv=sync,fsync 2>/dev/null \
        || { result reboot FAIL "cannot write the boot marker"; finish; }
    hb_stop
    say "DOMU-PHASE rebooting"
    sync
    reboot -f
    sleep 60
fi
finish

#!/usr/bin/env bash
# Builds everything the real-Xen end-to-end test boots, from nothing, into WORK:
#   rootfs/            Debian bookworm dom0 (Xen 4.17 tools + hypervisor, kernel, python3 + cffi, uvloop,
#                      prometheus-client; backends._native built for that python; /usr/local/bin/pvback and
#                      /usr/local/lib/pvback/dm-stub, one-line wrappers running pvback from the 9p share)
#   xen                the hypervisor, uncompressed (QEMU's multiboot loader cannot take the .gz)
#   vmlinuz, initrd    the dom0 kernel and its (small, MODULES=list) initramfs
#   dom0.img           ext4 image of rootfs (mke2fs -d: no loop mount, no root-only mount calls)
#   rootfs/opt/pvback-e2e/{vmlinuz,domU.cpio.gz}   the domU kernel and busybox initramfs, inside dom0
#
# Usage: build.sh WORK
# Prints "STAGE <name> <seconds>" for every stage it runs, on stdout; everything else goes to WORK/build.log.
# PVBACK_E2E_REUSE=1 keeps a finished rootfs in WORK (for iterating by hand; CI never sets it).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${1:?usage: build.sh WORK}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
LOG=$WORK/build.log
ROOTFS=$WORK/rootfs
REUSE=${PVBACK_E2E_REUSE:-0}
: > "$LOG"

die() { echo "build.sh: $*" >&2; echo "build.sh: see $LOG" >&2; tail -n 30 "$LOG" >&2 || true; exit 1; }

# shellcheck source=tests/e2e/build-lib.sh
. "$HERE/build-lib.sh"

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap mke2fs cpio gzip chroot python3; do
    command -v "$tool" >/dev/null || die "missing host tool: $tool"
done

# The Debian mirror the host itself uses (the brief: no hard-coded third-party mirror).
read -r MIRROR SECURITY < <(python3 - <<'EOF'
import glob, re
mirror = security = None
def consider(uri, suites):
    global mirror, security
    uri = uri.rstrip("/")
    if any(s.endswith("-security") for s in suites):
        security = security or uri
    elif "bookworm" in suites or "stable" in suites:
        mirror = mirror or uri
for f in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m:
            consider(m.group(2), [m.group(3)])
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in open(f).read().split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", para, re.M))
        if "deb" in fields.get("Types", "").split():
            for uri in fields.get("URIs", "").split():
                consider(uri, fields.get("Suites", "").split())
print(mirror or "http://deb.debian.org/debian", security or "http://deb.debian.org/debian-security")
EOF
)
echo "mirror=$MIRROR security=$SECURITY" >> "$LOG"

MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP # so the EXIT trap unmounts when the test kills the build
mount_chroot() {
    local d
    for d in proc sys dev dev/pts; do
        mkdir -p "$ROOTFS/$d"
        mountpoint -q "$ROOTFS/$d" && continue
        case $d in
            proc) mount -t proc proc "$ROOTFS/proc" ;;
            sys) mount -t sysfs sys "$ROOTFS/sys" ;;
            *) mount --bind "/$d" "$ROOTFS/$d" ;;
        esac
        MOUNTED+=("$ROOTFS/$d")
    done
}
in_chroot() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"; }

# ---- 1. debootstrap ----
if [ "$REUSE" = 1 ] && [ -e "$ROOTFS/.pvback-debootstrap" ]; then
    echo "reusing $ROOTFS (debootstrap)" >> "$LOG"
else
    stage_begin debootstrap
    rm -rf "$ROOTFS"
    # python3-ply: without it debootstrap cannot resolve python3-pycparser's virtual python3-ply-lex-3.10.
    debootstrap --variant=minbase \
        --include=python3,python3-cffi,python3-ply,busybox-static,kmod,udev,iproute2,procps \
        bookworm "$ROOTFS" "$MIRROR" >> "$LOG" 2>&1 || die "debootstrap failed"
    touch "$ROOTFS/.pvback-debootstrap"
    stage_end debootstrap
fi

# ---- 2. dom0 packages ----
# Installed after sources.list gained updates+security: hypervisor, tools and kernel from one suite.
# gcc/python3-dev: pvback's C module is built in here against dom0's own python (see stage native).
# python3-uvloop/python3-prometheus-client: what `pvback serve` runs on (uvloop is optional, metrics are not).
# dmsetup: the durability checks put dm-log-writes (a module of Debian's kernel) under one guest disk.
# swtpm/swtpm-tools: the guest's vTPM (pvback serve --types ...,vtpm runs one swtpm per vTPM, swtpm_setup makes
# its EK); tpm2-tools: its binaries and TCTI modules are copied into the domU initramfs (stage domU-initramfs).
# python3-pyroute2: netback creates the guests' taps with it; ethtool: copied into the domU, which reports what
# its netfront negotiated (ethtool -k).
# python3-cryptography: `pvback vtpm-manager` wraps the vTPMs' state keys with it (AESGCM).
# openvswitch-switch/python3-openvswitch: the net-ovs check's private OVS (ovsdb-server + ovs-vswitchd, started by
# the test driver; policy-rc.d keeps the service down) and the `ovs` IDL pvback plugs ports with.
DOM0_PACKAGES="xen-utils-4.17 xen-hypervisor-4.17-amd64 linux-image-amd64 gcc libc6-dev python3-dev \
python3-distutils python3-cffi python3-uvloop python3-prometheus-client e2fsprogs util-linux dmsetup \
swtpm swtpm-tools tpm2-tools libtss2-tcti-device0 python3-pyroute2 ethtool python3-cryptography \
openvswitch-switch python3-openvswitch"
if [ "$REUSE" = 1 ] && [ "$(cat "$ROOTFS/.pvback-packages" 2>/dev/null)" = "$DOM0_PACKAGES" ]; then
    echo "reusing $ROOTFS (packages)" >> "$LOG"
else
    stage_begin packages
    mount_chroot
    printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
    chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
    cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
    in_chroot apt-get update -q >> "$LOG" 2>&1 || die "apt-get update in the rootfs failed"
    in_chroot apt-get -y -q dist-upgrade >> "$LOG" 2>&1 || die "dist-upgrade failed"
    # initramfs-tools first and configured before the kernel, so the dom0 initrd is built once, small
    # (6.5 MB instead of 36 MB, boots ~3 s faster under TCG).
    in_chroot apt-get install -y -q --no-install-recommends initramfs-tools >> "$LOG" 2>&1 \
        || die "installing initramfs-tools failed"
    echo "MODULES=list" > "$ROOTFS/etc/initramfs-tools/conf.d/pvback-e2e"
    printf 'virtio_pci\nvirtio_blk\next4\n' > "$ROOTFS/etc/initramfs-tools/modules"
    # shellcheck disable=SC2086
    in_chroot apt-get install -y -q --no-install-recommends $DOM0_PACKAGES >> "$LOG" 2>&1 \
        || die "installing the dom0 packages failed"
    in_chroot apt-get clean >> "$LOG" 2>&1
    echo "$DOM0_PACKAGES" > "$ROOTFS/.pvback-packages"
    stage_end packages
fi

KVER=$(basename "$(ls -d "$ROOTFS"/lib/modules/* | sort -V | tail -n1)")
[ -n "$KVER" ] || die "no kernel modules in the rootfs"

# ---- 3. pvback's C module, built by dom0's own toolchain ----
# The host's backends._native is built for the host's python; compiling here with the rootfs's gcc,
# python3-dev and cffi yields a module that matches dom0's interpreter and libc whatever the host runs.
# dom0 still imports the `backends` package itself from the 9p share; a tiny import hook (below) makes only
# `backends._native` resolve to this build.
stage_begin native
NATIVE=$ROOTFS/opt/pvback-native
rm -rf "$NATIVE"
mkdir -p "$NATIVE/src/backends"
cp -a "$ROOT/csrc" "$ROOT/build_ffi.py" "$NATIVE/src/"
mount_chroot
in_chroot sh -c 'cd /opt/pvback-native/src && PVBACK_NO_URING=1 python3 build_ffi.py --backend-only' >> "$LOG" 2>&1 \
    || die "building backends._native inside the rootfs failed"
SO=$(cd "$NATIVE/src/backends" && ls _native.*.so)
mkdir -p "$NATIVE/backends"
mv "$NATIVE/src/backends/$SO" "$NATIVE/backends/$SO"
rm -rf "$NATIVE/src"
cp "$HERE/dom0/pvback_native_hook.py" "$ROOTFS/usr/lib/python3/dist-packages/pvback_native_hook.py"
echo "import pvback_native_hook" > "$ROOTFS/usr/lib/python3/dist-packages/pvback-native-hook.pth"
echo "native: $SO" >> "$LOG"
stage_end native

cleanup
MOUNTED=()

# ---- 4. Xen, dom0 kernel and initrd, dom0 init ----
stage_begin dom0-files
XENGZ=$(ls "$ROOTFS"/boot/xen-4.17*-amd64.gz 2>/dev/null | head -n1)
[ -n "$XENGZ" ] || die "no /boot/xen-4.17*-amd64.gz in the rootfs"
gunzip -c "$XENGZ" > "$WORK/xen" # multiboot needs the plain ELF
cp "$ROOTFS/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$WORK/initrd"
install -m 0755 "$HERE/dom0-init.sh" "$ROOTFS/sbin/dom0-init"
# pvback in dom0 is the project tree on the 9p share (dom0-init mounts it at /mnt/host), run by dom0's python3.
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/usr/local/lib/pvback"
printf '#!/bin/sh\nPYTHONPATH=/mnt/host${PYTHONPATH:+:$PYTHONPATH} exec python3 -m backends.daemon.cli "$@"\n' \
    > "$ROOTFS/usr/local/bin/pvback"
# xl's device_model_override: libxl runs it with QEMU's arguments.
printf '#!/bin/sh\nexec /usr/local/bin/pvback dm-stub "$@"\n' > "$ROOTFS/usr/local/lib/pvback/dm-stub"
chmod 0755 "$ROOTFS/usr/local/bin/pvback" "$ROOTFS/usr/local/lib/pvback/dm-stub"
# The user `pvback serve` drops to (contrib/sysusers.d/pvback.conf); `disk`: it serves the dm-log-writes device.
in_chroot sh -c 'id pvback >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/pvback \
    --shell /usr/sbin/nologin --groups disk pvback' >> "$LOG" 2>&1 || die "cannot create the pvback user"
# The vif hotplug script an operator installs with pvback (xl: script=vif-pvback).
install -m 0755 "$ROOT/contrib/xen/vif-pvback" "$ROOTFS/etc/xen/scripts/vif-pvback"
# A persistent rootfs keeps old guest logs: start clean.
rm -rf "$ROOTFS/var/log/xen" "$ROOTFS/var/lib/xen"/* "$ROOTFS/run"/* 2>/dev/null || true
mkdir -p "$ROOTFS/var/log/xen/console" "$ROOTFS/mnt/host" "$ROOTFS/mnt/out"
stage_end dom0-files

# ---- 5. domU initramfs: static busybox, the front-end modules, e2fsprogs and the test script ----
stage_begin domU-initramfs
D=$WORK/domU-root
rm -rf "$D"
mkdir -p "$D"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc}
cp "$ROOTFS/bin/busybox" "$D/bin/busybox"
# The front ends and ext4 (a module in Debian's kernel), with their dependencies, in load order.
copy_modules "$D" xen-blkfront ext4 xen-netfront xen-tpmfront
grep -qx xen-blkfront.ko "$D/lib/modules/order" || die "xen-blkfront.ko not found for $KVER"
# busybox has neither mkfs.ext4 nor fsck nor ethtool: bring the real ones and the libraries they load.
for b in /sbin/mke2fs /sbin/e2fsck /usr/sbin/ethtool; do
    cp "$ROOTFS$b" "$D/sbin/"
    for lib in $(in_chroot ldd "$b" 2>>"$LOG" | grep -o '/[^ ]*\.so[^ ]*'); do
        mkdir -p "$D$(dirname "$lib")"
        cp -L "$ROOTFS$lib" "$D$lib"
    done
done
# tpm2-tools for the vTPM checks: one multi-call binary `tpm2` (tpm2_* are symlinks to it), its libraries, and
# the TCTI module libtss2-tctildr dlopens for TPM2TOOLS_TCTI=device:/dev/tpm0 (ldd cannot see a dlopen).
TCTI=$(cd "$ROOTFS" && ls usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 2>/dev/null) \
    || die "no libtss2-tcti-device.so.0 in the rootfs (libtss2-tcti-device0)"
cp "$ROOTFS/usr/bin/tpm2" "$D/bin/tpm2"
for t in getrandom pcrextend pcrread nvdefine nvwrite nvread nvundefine getcap; do
    ln -sf tpm2 "$D/bin/tpm2_$t"
done
for b in /usr/bin/tpm2 "/$TCTI"; do
    for lib in $(in_chroot ldd "$b" 2>>"$LOG" | grep -o '/[^ ]*\.so[^ ]*'); do
        mkdir -p "$D$(dirname "$lib")"
        cp -L "$ROOTFS$lib" "$D$lib"
    done
done
mkdir -p "$D/$(dirname "$TCTI")"
cp -L "$ROOTFS/$TCTI" "$D/$TCTI"
ln -sf mke2fs "$D/sbin/mkfs.ext4"
ln -sf e2fsck "$D/sbin/fsck.ext4"
# Debian's own mke2fs.conf: ext4 with a journal (has_journal), so the guest's fsyncs go through jbd2
# commits (flush + FUA), as on any real Debian guest.
cp "$ROOTFS/etc/mke2fs.conf" "$D/etc/mke2fs.conf"
grep -q has_journal "$D/etc/mke2fs.conf" || die "the rootfs's /etc/mke2fs.conf does not enable has_journal"
install -m 0755 "$HERE/domU-init.sh" "$D/init"
install -m 0755 "$HERE/domU-dd-init.sh" "$D/init-dd" # the driver-domain checks' guest (rdinit=/init-dd)
install -m 0644 "$HERE/guest-lib.sh" "$D/guest-lib.sh" # what both scripts source
(cd "$D" && find . | cpio -o -H newc 2>>"$LOG" | gzip -1) > "$WORK/domU.cpio.gz"
mkdir -p "$ROOTFS/opt/pvback-e2e"
cp "$WORK/domU.cpio.gz" "$ROOTFS/opt/pvback-e2e/domU.cpio.gz"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$ROOTFS/opt/pvback-e2e/vmlinuz"
stage_end domU-initramfs

# ---- 5b. the driver domain (#19): its root image dd.img (dom0's second disk) and initramfs ----
ROOT=$ROOT HERE=$HERE WORK=$WORK ROOTFS=$ROOTFS KVER=$KVER LOG=$LOG "$HERE/build-dd.sh" \
    || die "building the driver domain failed"

# ---- 6. the dom0 disk image ----
stage_begin image
rm -f "$WORK/dom0.img"
mke2fs -q -t ext4 -L dom0 -E root_owner=0:0 -d "$ROOTFS" "$WORK/dom0.img" 3G >> "$LOG" 2>&1 \
    || die "mke2fs -d failed"
stage_end image
echo "kernel=$KVER" >> "$LOG"

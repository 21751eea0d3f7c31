#!/usr/bin/env bash
# The driver domain of the real-Xen test (#19), built by build.sh after the dom0 rootfs is complete:
#   dd.img                            ext4 root of the driver domain: the dom0 rootfs (python3 + cffi, pyroute2,
#                                     the Xen tools for `xl devd`, backends._native) trimmed, pvback's source in
#                                     /opt/pvback-src (compiled), /sbin/dd-init, QEMU's path -> `pvback dm-stub`.
#                                     QEMU gives it to dom0 as its second virtio disk (/dev/vdb), and dom0's
#                                     `pvback serve` serves it to the driver domain as xvda: pvback boots pvback.
#   rootfs/opt/pvback-e2e/dd.cpio.gz  the driver domain's initramfs: busybox, xen-blkfront + ext4, an /init that
#                                     mounts xvda and switch_roots to /sbin/dd-init
#
# Usage: build-dd.sh (from build.sh, with ROOT HERE WORK ROOTFS KVER LOG in the environment)
# Prints "STAGE <name> <seconds>" per stage on stdout, like build.sh.
set -euo pipefail

: "${ROOT:?}" "${HERE:?}" "${WORK:?}" "${ROOTFS:?}" "${KVER:?}" "${LOG:?}"
die() { echo "build-dd.sh: $*" >&2; exit 1; }
# shellcheck source=tests/e2e/build-lib.sh
. "$HERE/build-lib.sh"
in_chroot() { chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "${@:2}"; }

# ---- the initramfs: just enough to mount the root disk dom0's pvback serves ----
stage_begin dd-initramfs
I=$WORK/dd-initramfs
rm -rf "$I"
mkdir -p "$I"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOTFS/bin/busybox" "$I/bin/busybox"
# The rest of what dd-init loads, too: insmod from RAM here is seconds faster under TCG than modprobe reading
# modules.dep and each module through the PV disk after the switch.
copy_modules "$I" xen-blkfront ext4 xen-gntdev xen-evtchn xen-gntalloc xen-privcmd xenfs xen-netfront tun bridge
grep -qx xen-blkfront.ko "$I/lib/modules/order" || die "xen-blkfront.ko not found for $KVER"
install -m 0755 "$HERE/dd-initramfs-init.sh" "$I/init"
mkdir -p "$ROOTFS/opt/pvback-e2e"
(cd "$I" && find . | cpio -o -H newc 2>>"$LOG" | gzip -1) > "$ROOTFS/opt/pvback-e2e/dd.cpio.gz"
stage_end dd-initramfs

# ---- the root filesystem: the dom0 rootfs as hard links, trimmed; new files replace links, never write them ----
stage_begin dd-image
R=$WORK/dd-root
rm -rf "$R"
cp -al "$ROOTFS" "$R"
# What a driver domain does not need: the compiler, the hypervisor and kernel images, swtpm and tpm2-tools (no
# vTPM here), docs; the domU kernel and initramfs live in dom0 only.
rm -rf "$R/boot" "$R/opt/pvback-e2e" "$R/usr/share/doc" "$R/usr/share/man" "$R/usr/share/info" \
    "$R/usr/lib/gcc" "$R/usr/libexec/gcc" "$R/var/cache/apt" "$R/var/lib/apt/lists" "$R/var/log/xen" \
    "$R/usr/lib/x86_64-linux-gnu/swtpm" "$R/sbin/dom0-init"
rm -f "$R"/usr/bin/*gcc* "$R"/usr/bin/x86_64-linux-gnu-* "$R"/usr/bin/swtpm* "$R"/usr/bin/tpm2*
rm -rf "$R/lib/modules/$KVER/kernel/drivers/gpu" "$R/lib/modules/$KVER/kernel/sound" \
    "$R/lib/modules/$KVER/kernel/drivers/media" "$R/lib/modules/$KVER/kernel/drivers/infiniband" \
    "$R/lib/modules/$KVER/kernel/drivers/net/wireless"
mkdir -p "$R/var/log/xen" "$R/var/lib/pvback-dd" "$R/opt/pvback-src"
install -m 0755 "$HERE/dd-init.sh" "$R/sbin/dd-init"
# pvback itself, from the tree under test (in dom0 it runs from the 9p share; a driver domain has none).
(cd "$ROOT" && tar --exclude=__pycache__ -cf - backends) | tar -xf - -C "$R/opt/pvback-src"
rm -f "$R/usr/local/bin/pvback"
printf '#!/bin/sh\nPYTHONPATH=/opt/pvback-src exec python3 -m backends.daemon.cli "$@"\n' > "$R/usr/local/bin/pvback"
chmod 0755 "$R/usr/local/bin/pvback"
in_chroot "$R" python3 -m compileall -q /opt/pvback-src/backends >> "$LOG" 2>&1 \
    || die "compiling pvback in the driver domain's rootfs failed"
# `xl devd` starts "QEMU" for every qdisk backend of this domain (libxl's qemu-xen path, fixed at build time):
# `pvback serve` serves them, so `pvback dm-stub` stands there and only tells libxl it runs (docs/driver-domain.md).
QEMU_XEN=$(strings "$R"/usr/lib/x86_64-linux-gnu/libxenlight.so.* 2>/dev/null | grep -m1 -E '^/.*qemu-system-i386$' || true)
[ -n "$QEMU_XEN" ] || die "cannot find libxl's qemu-xen path in libxenlight"
echo "libxl qemu-xen path: $QEMU_XEN" >> "$LOG"
rm -f "$R$QEMU_XEN"
mkdir -p "$R$(dirname "$QEMU_XEN")"
install -m 0755 "$ROOT/contrib/xen/qemu-dm-pvback" "$R$QEMU_XEN"
rm -f "$WORK/dd.img"
mke2fs -q -t ext4 -L pvdd -E root_owner=0:0 -d "$R" "$WORK/dd.img" 1536M >> "$LOG" 2>&1 || die "mke2fs -d (dd.img) failed"
echo "dd-root: $(du -sm "$R" | cut -f1) MiB" >> "$LOG"
rm -rf "$R"
stage_end dd-image

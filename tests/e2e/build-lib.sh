# shellcheck shell=bash
# What build.sh and build-dd.sh both do, sourced by each (bash; ROOTFS, KVER and LOG set by the caller).

# A stage's wall time on stdout ("STAGE <name> <seconds>"), which the test reads into stages.txt.
stage_t0=0
stage_begin() { stage_t0=$(date +%s%N); echo "== $1" >> "$LOG"; }
stage_end() {
    local ms=$((($(date +%s%N) - stage_t0) / 1000000))
    printf 'STAGE %s %d.%d\n' "$1" $((ms / 1000)) $((ms % 1000 / 100))
}

# copy_modules DIR MODULE...: the modules of ROOTFS's kernel KVER with their dependencies, uncompressed into
# DIR/lib/modules, their names in load order in DIR/lib/modules/order (an initramfs insmods them from RAM).
copy_modules() {
    local dir=$1 m f name deps
    shift
    : > "$dir/lib/modules/order"
    for m in "$@"; do
        deps=$(chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            modprobe -S "$KVER" --show-depends "$m" 2>>"$LOG") || { echo "no module $m" >> "$LOG"; continue; }
        for f in $(echo "$deps" | awk '$1 == "insmod" {print $2}'); do
            name=$(basename "$f")
            name=${name%.xz}
            name=${name%.zst}
            grep -qx "$name" "$dir/lib/modules/order" && continue
            case $f in
                *.xz) xz -dc "$ROOTFS$f" > "$dir/lib/modules/$name" ;;
                *.zst) zstd -qdc "$ROOTFS$f" > "$dir/lib/modules/$name" ;;
                *) cp "$ROOTFS$f" "$dir/lib/modules/$name" ;;
            esac
            echo "$name" >> "$dir/lib/modules/order"
        done
    done
}

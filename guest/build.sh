#!/bin/sh
# Build the Pairvisor test guest: OUT_DIR/vmlinuz and OUT_DIR/initrd.img.
#
# Usage: guest/build.sh [OUT_DIR]        (default: <repo>/target/guest)
#
# Environment:
#   PV_KERNEL_DEB  use this linux-image .deb instead of looking one up
#   PV_FORCE=1     rebuild even if the outputs are up to date
#
# Needs: dpkg-deb, cpio, gzip, busybox-static (or apt-get download of it),
# apt-cache/apt-get (only to locate and download the kernel .deb once).
# No root needed (device nodes are written straight into the cpio archive).
# See guest/README.md for the guest contract.
set -eu

GUEST_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$GUEST_DIR")
OUT_DIR=${1:-$REPO_DIR/target/guest}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
CACHE_DIR=$OUT_DIR/cache
mkdir -p "$CACHE_DIR"

# Modules wanted in the initramfs, in load order. Dependencies (read from the
# .ko modinfo "depends=" field) are inserted before the module needing them.
# A module that is built into the kernel (modules.builtin) is skipped.
WANTED_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
virtio_pci virtio_blk virtio_net virtio_console pvpanic pvpanic_mmio pvpanic_pci
evdev button"

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Download a package (by name) into $CACHE_DIR with apt-get download.
apt_download() {
    (cd "$CACHE_DIR" && apt-get download "$1") && return 0
    log "apt-get download $1 failed, running apt-get update and retrying"
    apt-get update >&2 || true
    (cd "$CACHE_DIR" && apt-get download "$1")
}

# ---------------------------------------------------------------- kernel .deb
find_kernel_deb() {
    if [ -n "${PV_KERNEL_DEB:-}" ]; then
        [ -f "$PV_KERNEL_DEB" ] || die "PV_KERNEL_DEB=$PV_KERNEL_DEB does not exist"
        echo "$PV_KERNEL_DEB"
        return
    fi
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        # Package lists not there yet: update once, then retry.
        apt-get update >&2 || true
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    fi
    if [ -z "$pkg" ]; then
        # No apt metadata at all: fall back to whatever is cached.
        deb=$(ls -t "$CACHE_DIR"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n 1 || true)
        [ -n "$deb" ] || die "cannot resolve linux-image-cloud-amd64 and no cached kernel .deb"
        echo "$deb"
        return
    fi
    deb=$(ls -t "$CACHE_DIR/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        apt_download "$pkg" >&2 || die "apt-get download $pkg failed"
        deb=$(ls -t "$CACHE_DIR/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
        [ -n "$deb" ] || die "downloaded $pkg but found no .deb in $CACHE_DIR"
    fi
    echo "$deb"
}

# ------------------------------------------------------------ static busybox
find_busybox() {
    if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
        echo /bin/busybox
        return
    fi
    if [ ! -x "$CACHE_DIR/busybox-static/bin/busybox" ]; then
        deb=$(ls -t "$CACHE_DIR"/busybox-static_*.deb 2>/dev/null | head -n 1 || true)
        if [ -z "$deb" ]; then
            log "busybox-static not installed, downloading it"
            apt_download busybox-static >&2 || die "apt-get download busybox-static failed"
            deb=$(ls -t "$CACHE_DIR"/busybox-static_*.deb | head -n 1)
        fi
        rm -rf "$CACHE_DIR/busybox-static"
        dpkg-deb -x "$deb" "$CACHE_DIR/busybox-static"
    fi
    echo "$CACHE_DIR/busybox-static/bin/busybox"
}

KERNEL_DEB=$(find_kernel_deb)
BUSYBOX=$(find_busybox)
[ -x "$BUSYBOX" ] || die "no busybox at $BUSYBOX"
if command -v file >/dev/null 2>&1; then
    file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not statically linked"
fi

VMLINUZ=$OUT_DIR/vmlinuz
INITRD=$OUT_DIR/initrd.img
INPUTS="$GUEST_DIR/build.sh $GUEST_DIR/init $KERNEL_DEB $BUSYBOX"

up_to_date() {
    [ -f "$VMLINUZ" ] && [ -f "$INITRD" ] || return 1
    for f in $INPUTS; do
        [ "$VMLINUZ" -nt "$f" ] && [ "$INITRD" -nt "$f" ] || return 1
    done
    # The kernel .deb used last time must be the same one.
    [ "$(cat "$OUT_DIR/kernel-deb.txt" 2>/dev/null)" = "$(basename "$KERNEL_DEB")" ]
}

if [ "${PV_FORCE:-0}" != 1 ] && up_to_date; then
    log "up to date: $VMLINUZ $INITRD"
    exit 0
fi

log "kernel: $KERNEL_DEB"
log "busybox: $BUSYBOX"

WORK=$(mktemp -d "$OUT_DIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# ------------------------------------------------------- extract the kernel
dpkg-deb -x "$KERNEL_DEB" "$WORK/kpkg"
KVMLINUZ=$(ls "$WORK"/kpkg/boot/vmlinuz-* | head -n 1)
[ -f "$KVMLINUZ" ] || die "no /boot/vmlinuz-* in $KERNEL_DEB"
KVER=${KVMLINUZ##*/vmlinuz-}
MODDIR=$WORK/kpkg/lib/modules/$KVER
[ -d "$MODDIR" ] || die "no lib/modules/$KVER in $KERNEL_DEB"

# ------------------------------------------------------- resolve modules
ROOT=$WORK/root
mkdir -p "$ROOT/lib/modules"
ORDER_FILE=$ROOT/lib/modules/load.order
: > "$ORDER_FILE"

# Index: module name (dashes -> underscores) -> path of its .ko[.xz|.zst].
find "$MODDIR/kernel" -type f \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' \) |
    while read -r p; do
        b=${p##*/}; b=${b%.xz}; b=${b%.zst}; b=${b%.ko}
        echo "$(echo "$b" | tr - _) $p"
    done > "$WORK/modindex"

is_builtin() {
    # modules.builtin lists paths like kernel/drivers/foo/bar-baz.ko
    sed 's,.*/,,; s,\.ko$,,; s,-,_,g' "$MODDIR/modules.builtin" | grep -qx "$1"
}

add_module() {
    local name path out deps d
    name=$(echo "$1" | tr - _)
    grep -qx "$name" "$ORDER_FILE" && return 0
    if is_builtin "$name"; then
        log "module $name is built in"
        return 0
    fi
    path=$(awk -v n="$name" '$1 == n { print $2; exit }' "$WORK/modindex")
    [ -n "$path" ] || die "module $name not found in $KERNEL_DEB"
    out=$ROOT/lib/modules/$name.ko
    case $path in
        *.xz) xz -dc "$path" > "$out" ;;
        *.zst) zstd -qdc "$path" > "$out" ;;
        *) cp "$path" "$out" ;;
    esac
    deps=$(tr '\0' '\n' < "$out" | sed -n 's/^depends=//p' | head -n 1 | tr , ' ')
    for d in $deps; do
        add_module "$d"
    done
    echo "$name" >> "$ORDER_FILE"
}

for m in $WANTED_MODULES; do
    add_module "$m"
done
log "modules (load order): $(tr '\n' ' ' < "$ORDER_FILE")"

# ------------------------------------------------------- initramfs tree
mkdir -p "$ROOT/bin" "$ROOT/sbin" "$ROOT/dev" "$ROOT/proc" "$ROOT/sys" \
    "$ROOT/run" "$ROOT/tmp" "$ROOT/etc/acpi/PWRF" "$ROOT/var/log" "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 755 "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf busybox "$ROOT/bin/$applet"
done
cp "$GUEST_DIR/init" "$ROOT/init"
chmod 755 "$ROOT/init"
# busybox acpid maps the power button (evdev KEY_POWER) to the action
# "PWRF/00000080" and runs /etc/acpi/PWRF/00000080.
cat > "$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "pv-guest: acpi power button, powering off" > /dev/ttyS0
sync
exec poweroff -f
EOF
chmod 755 "$ROOT/etc/acpi/PWRF/00000080"
echo "$KVER" > "$ROOT/etc/pv-guest-kernel"

# newc header for one entry without data (device node).
# args: name mode(octal) rdevmajor rdevminor ino
cpio_node() {
    namesize=$(( ${#1} + 1 ))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$5" "$(( $2 ))" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$1"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
}

# Device nodes the kernel needs before /init mounts devtmpfs (the initial
# console). Written as a second, concatenated cpio archive so no mknod/root
# is needed.
{
    cpio_node dev/console 020600 5 1 900001
    cpio_node dev/null 020666 1 3 900002
    cpio_node dev/ttyS0 020660 4 64 900003
    # trailer
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 0 0 0 1 0 0 0 0 0 0 11 0
    printf 'TRAILER!!!\0'
    head -c 3 /dev/zero   # (110 + 11) % 4 = 1 -> pad 3
} > "$WORK/devnodes.cpio"

(cd "$ROOT" && find . -mindepth 1 | sed 's,^\./,,' | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0) > "$WORK/root.cpio"
cat "$WORK/root.cpio" "$WORK/devnodes.cpio" | gzip -9n > "$WORK/initrd.img"

cp "$KVMLINUZ" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$VMLINUZ"
mv -f "$WORK/initrd.img" "$INITRD"
basename "$KERNEL_DEB" > "$OUT_DIR/kernel-deb.txt"
log "built $VMLINUZ ($KVER) and $INITRD ($(wc -c < "$INITRD") bytes)"

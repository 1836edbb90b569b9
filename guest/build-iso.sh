#!/usr/bin/env bash
# Builds a bootable ISO (isolinux, BIOS) of the test guest, for tests of
# "boot once from a VCD": OUT_DIR/guest.iso from OUT_DIR/vmlinuz and
# OUT_DIR/initrd.img (made by guest/build.sh). Needs isolinux,
# syslinux-common and genisoimage.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/guest}
out=$(cd "$out" && pwd)
iso=$out/guest.iso
if [[ -f $iso && $iso -nt $out/vmlinuz && $iso -nt $out/initrd.img ]]; then
  exit 0
fi
for f in /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32; do
  [[ -f $f ]] || { echo "build-iso: $f missing; apt-get install isolinux syslinux-common" >&2; exit 1; }
done
command -v genisoimage >/dev/null || { echo "build-iso: genisoimage missing; apt-get install genisoimage" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/isolinux"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$stage/isolinux/"
cp "$out/vmlinuz" "$stage/isolinux/vmlinuz"
cp "$out/initrd.img" "$stage/isolinux/initrd.img"
# The serial line makes isolinux itself quiet on the VGA-less test VMs.
cat > "$stage/isolinux/isolinux.cfg" <<'CFG'
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL vmlinuz
  APPEND initrd=initrd.img console=ttyS0 panic=0 quiet pv.bootsource=cdrom
CFG
genisoimage -quiet -o "$iso.tmp" -b isolinux/isolinux.bin -c isolinux/boot.cat \
  -no-emul-boot -boot-load-size 4 -boot-info-table -J -R -V PVGUEST "$stage"
mv "$iso.tmp" "$iso"
echo "built $iso"

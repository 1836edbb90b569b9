#!/bin/sh
# Build the test guest (if needed) and run the smoke test against it.
# Usage: guest/smoke.sh [OUT_DIR]     (default: <repo>/target/guest)
# Exits non-zero on any failure. Whole run bounded to 10 minutes.
set -eu
GUEST_DIR=$(cd "$(dirname "$0")" && pwd)
OUT_DIR=${1:-$(dirname "$GUEST_DIR")/target/guest}
"$GUEST_DIR/build.sh" "$OUT_DIR"
exec timeout -k 10 600 python3 "$GUEST_DIR/smoke.py" "$OUT_DIR/vmlinuz" "$OUT_DIR/initrd.img"

#!/usr/bin/env bash
# Installs the console's npm dependencies (package-lock.json, exact versions):
# @novnc/novnc, vendored into the binary by build.rs, and playwright-core,
# which drives Debian's chromium in the browser test. Never downloads a
# browser. Idempotent: does nothing when node_modules matches the lock file.
# Called by scripts/test and scripts/demo.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "npm-install: node and npm are needed (Node.js 20 or newer) to vendor noVNC into the console; install them (e.g. the nodejs package from NodeSource)" >&2
  exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if (( major < 20 )); then
  echo "npm-install: Node.js $(node --version) is too old; playwright-core needs 20 or newer" >&2
  exit 1
fi
stamp=node_modules/.package-lock.json
if [[ -f $stamp && $stamp -nt package-lock.json && -f node_modules/@novnc/novnc/core/rfb.js ]]; then
  echo "npm-install: up to date"
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error

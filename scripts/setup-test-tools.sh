#!/usr/bin/env bash
# Installs everything the test tiers need that pip does not: Debian packages and Go-built tools.
# Idempotent and cached (Go builds under ~/.cache/hostdev), prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
t() { local s=$(date +%s); "$@"; echo "setup: $* took $(( $(date +%s) - s ))s" >&2; }
for step in scripts/setup.d/*.sh; do
  [ -e "$step" ] || continue
  t bash "$step"
done

#!/usr/bin/env bash
# Copies the API's source of truth (crds/*.yaml) into the Helm chart's crds/.
#   scripts/sync-chart-crds.sh          write the copies (and drop copies of removed CRDs)
#   scripts/sync-chart-crds.sh --check  exit 1 and name every file that differs (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
src=crds
dst=charts/hostdev/crds
check=0
[ "${1:-}" = "--check" ] && check=1
stale=0
for f in "$src"/*.yaml; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$dst/$name"; then
    if [ $check = 1 ]; then
      echo "out of date: $dst/$name (differs from $f)" >&2
      stale=1
    else
      cp "$f" "$dst/$name"
      echo "synced $dst/$name"
    fi
  fi
done
for f in "$dst"/*.yaml; do
  [ -e "$f" ] || continue
  if [ ! -e "$src/$(basename "$f")" ]; then
    if [ $check = 1 ]; then
      echo "stale: $f (no $src/$(basename "$f"))" >&2
      stale=1
    else
      rm "$f"
      echo "removed $f"
    fi
  fi
done
if [ $check = 1 ] && [ $stale = 1 ]; then
  echo "run scripts/sync-chart-crds.sh to update the chart's CRDs" >&2
  exit 1
fi
exit 0

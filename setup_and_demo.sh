#!/usr/bin/env bash
# The first command: install (a .venv of its own unless one is active; CPU torch pinned) and run the demo.
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "cidistill: the demo data comes from the npm registry: install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2; exit 1; }
# the demo's npm packages come down beside pip's install (standard library only; the demo fetches what is
# missing itself and reports a failure in one line)
python3 -m cidistill.app.demo_packages >/dev/null 2>&1 &
packages=$!
source scripts/install.sh cpu,demo
wait "$packages" || true
"$PY" -m cidistill demo --workdir "${1:-runs/demo}"
[ -n "${VIRTUAL_ENV:-}" ] || echo "To use the cidistill command: source .venv/bin/activate"

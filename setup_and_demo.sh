#!/usr/bin/env bash
# The first command: install (a .venv of its own unless one is active; CPU torch pinned) and run the demo.
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "cidistill: the demo data comes from the npm registry: install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2; exit 1; }
source scripts/install.sh cpu,demo
"$PY" -m cidistill demo --workdir "${1:-runs/demo}"
[ -n "${VIRTUAL_ENV:-}" ] || echo "To use the cidistill command: source .venv/bin/activate"

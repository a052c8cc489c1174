#!/usr/bin/env bash
# One command on a fresh machine: install (CPU torch pinned, no CUDA wheels) and run the demo.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e '.[cpu,demo,dev]'
cidistill demo --workdir "${1:-runs/demo}"

#!/usr/bin/env bash
# The second command: install what the tests need (the dev and onnx extras; headless Chromium for the card
# test), check the import layers, run the test suite. Arguments go to pytest (-m "not slow": the quick run).
set -euo pipefail
cd "$(dirname "$0")"
command -v npm >/dev/null || { echo "cidistill: the tests' demo data comes from the npm registry: install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2; exit 1; }
source scripts/install.sh cpu,demo,dev,onnx
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  echo "cidistill: installing headless Chromium for the data-card browser test (apt)"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || { echo "cidistill: could not install Chromium: apt-get install chromium, then rerun" >&2; exit 1; }
fi
# The suite's largest moment is ~2.5 GB under the temp folder (the small demo's run and one test's outputs at once).
free_mb=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
[ "${free_mb:-0}" -ge 3000 ] || echo "cidistill: warning: ${free_mb:-?} MB free under ${TMPDIR:-/tmp}; the tests need ~3 GB there at once (set TMPDIR to a roomier folder)" >&2
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
"$(dirname "$PY")/lint-imports" --no-cache --no-logo
exec "$PY" -m pytest -q tests "$@"

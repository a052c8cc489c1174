#!/usr/bin/env bash
# Install cidistill with the given extras into the active virtual environment, else into ./.venv (made here
# if missing): CPU torch pinned first (constraints.txt), so pip never pulls CUDA wheels. Sourced by
# setup_and_demo.sh and run_tests.sh; leaves PY pointing at the environment's python.
set -euo pipefail
extras="${1:-cpu,demo}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv" || { echo "cidistill: could not create .venv: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
  PY="$root/.venv/bin/python"
fi
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$root/.venv-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  echo "cidistill: installing (extras: $extras) into $(dirname "$(dirname "$PY")")"
  # pip byte-compiles every module it installs (~45 s of a 2-core first install); Python compiles only what is
  # imported, once, unless told not to write bytecode
  nc=(); [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] || nc=(--no-compile)
  "$PY" -m pip install -q "${nc[@]}" -c "$root/constraints.txt" torch 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q "${nc[@]}" -c "$root/constraints.txt" -e "$root[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "from cidistill.core.runtime import import_open_clip; import_open_clip()" 2>/dev/null || { echo "cidistill: the install failed (see pip's messages above)" >&2; exit 1; }
  touch "$stamp"
fi
export PY

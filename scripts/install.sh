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
  PY="$root/.venv/bin/python"
  # a .venv whose making was stopped (Ctrl-C while venv installed pip) is made again, not used as it is
  if [ ! -x "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    [ ! -e "$root/.venv" ] || echo "cidistill: $root/.venv is incomplete (no pip in it): making it again"
    python3 -m venv --clear "$root/.venv" || { echo "cidistill: could not create .venv: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  fi
fi
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {  # pip's own exit status decides: an earlier install that still imports must not hide a failed one
  local rc=0 log; log="$(mktemp)"
  "$PY" -m pip install -q "${nc[@]}" -c "$root/constraints.txt" "$@" > "$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  [ "$rc" = 0 ] || { echo "cidistill: pip could not install $* (its messages are above)" >&2; exit 1; }
}
uv_install() {  # uv fetches and unpacks in parallel: the project's packages in ~10 s where pip takes ~2 min
  # (it reads no pip config: with an index of pip's own set, or no uv to be had, pip does it)
  local conf; conf="$("$PY" -m pip config list 2>/dev/null || true)"
  [ -z "${PIP_INDEX_URL:-}" ] && [[ "$conf" != *".index-url="* ]] || return 1
  "$PY" -m pip install -q "${nc[@]}" uv >/dev/null 2>&1 || return 1
  # the certificates pip is told of (a TLS-inspecting proxy's CA), else the system's
  local cert="${SSL_CERT_FILE:-${PIP_CERT:-$(sed -n "s/^[a-z:.]*cert='\(.*\)'$/\1/p" <<< "$conf" | head -1)}}"
  local tls=(UV_NATIVE_TLS=1); [ -z "$cert" ] || tls+=("SSL_CERT_FILE=$cert")
  env "${tls[@]}" "$(dirname "$PY")/uv" pip install -q --python "$PY" -c "$root/constraints.txt" "$@" \
    || { echo "cidistill: uv could not install $* (its messages are above): pip instead" >&2; return 1; }
}
stamp="$root/.venv-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  echo "cidistill: installing (extras: $extras) into $(dirname "$(dirname "$PY")")"
  # pip byte-compiles every module it installs (~45 s of a 2-core first install); Python compiles only what is
  # imported, once, unless told not to write bytecode
  nc=(); [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] || nc=(--no-compile)
  pip_install torch  # pip: it takes the CPU build this machine's pip knows of; uv would fetch a CUDA one
  uv_install -e "$root[$extras]" || pip_install -e "$root[$extras]"
  "$PY" -c "from cidistill.core.runtime import import_open_clip; import_open_clip()" 2>/dev/null || { echo "cidistill: the install failed: open_clip does not import (see pip's messages above)" >&2; exit 1; }
  touch "$stamp"
fi
export PY

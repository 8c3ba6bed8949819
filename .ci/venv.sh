#!/usr/bin/env bash
# Create (or reuse) the project venv, cached outside the repo and keyed by the requirements hash.
# Prints the venv path on stdout. Builds from nothing when no cache exists.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
key=$(cat "$here/.ci/requirements.txt" | sha256sum | cut -c1-12)
cache=${FGSTUDY_VENV_CACHE:-$HOME/.cache/fgstudy}
venv=$cache/venv-$key
if [ ! -f "$venv/.complete" ]; then
  echo "[venv] building $venv from nothing (torch is ~2 min from local disk)" >&2
  rm -rf "$venv"; mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$here/.ci/requirements.txt" >&2
  "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >&2
  touch "$venv/.complete"
fi
# the package itself is installed editable from this checkout every time (cheap, checkout may move)
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here" >&2 2>/dev/null || \
  "$venv/bin/pip" install -q --no-deps -e "$here" >&2
echo "$venv"

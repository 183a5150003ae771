#!/usr/bin/env bash
# Creates (if missing) and updates the tests' Python environment, .venv at
# the repository root, from clients/python/requirements.txt. A no-op in a
# few milliseconds when .venv already holds what that file pins: the file's
# digest is stamped into .venv after a successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
requirements=clients/python/requirements.txt
stamp=$venv/requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)

# Up to date: the stamp matches and the interpreter still runs (a system
# Python upgraded under it leaves a venv whose python is gone).
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null; then
  exit 0
fi

# Debian ships venv's ensurepip in python3-venv, apart from python3: without
# it `python3 -m venv` stops with "ensurepip is not available".
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: python3 python3-venv"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
fi

# A venv whose python or pip does not run (half-made, or its interpreter
# gone) is made again rather than patched.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  echo "creating $venv ($(python3 --version))"
  python3 -m venv "$venv"
fi
echo "installing $requirements into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
echo "$want" >"$stamp"

#!/usr/bin/env bash
# Fetches Prometheus and promtool (Debian's `prometheus` package) into
# .tools/prometheus without installing or starting a system service: the
# alert test (tests/tests/alerts.rs) runs the shipped prometheus.yml and
# alerts.yml against a live mesh with them. Does nothing if they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/prometheus
[ -x "$dest/usr/bin/prometheus" ] && [ -x "$dest/usr/bin/promtool" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download runs as the caller and writes into the current directory;
# the package lists may be missing on a fresh machine.
if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
  $sudo apt-get update -qq
  (cd "$tmp" && apt-get download -qq prometheus)
fi
mkdir -p "$dest"
dpkg -x "$tmp"/prometheus_*.deb "$dest"
"$dest/usr/bin/prometheus" --version | head -1

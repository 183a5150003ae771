#!/usr/bin/env bash
# Installs the mesh on this host: binaries, systemd units, example configs
# (never overwriting existing ones) and the `mesh` system user.
#
#   sudo deploy/install.sh [--bin-dir target/release] [--root /]
#
# Then edit /etc/mesh/*, put this host's certificate in /etc/mesh/tls/
# (meshctl certs-issue), and enable what the host runs, e.g.
#   systemctl enable --now mesh-node@chat mesh-sidecar@chat
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin_dir="$here/../target/release"
root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

install -d "$root/usr/local/bin" "$root/etc/systemd/system" "$root/etc/mesh/tls" \
  "$root/var/lib/mesh/models" "$root/var/lib/mesh/etcd" "$root/usr/local/share/doc/mesh"
for b in mesh-node mesh-sidecar meshctl; do
  install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
done
install -m 0644 "$here"/systemd/*.service "$root/etc/systemd/system/"
for f in "$here"/config/*; do
  target="$root/etc/mesh/$(basename "$f")"
  [ -e "$target" ] || install -m 0640 "$f" "$target"
done
install -m 0644 "$here/DEPLOY.md" "$root/usr/local/share/doc/mesh/DEPLOY.md"

if [ "$root" = / ]; then
  getent group mesh >/dev/null || groupadd --system mesh
  getent passwd mesh >/dev/null || useradd --system --gid mesh --home-dir /var/lib/mesh --shell /usr/sbin/nologin mesh
  chown -R mesh:mesh /var/lib/mesh
  chgrp -R mesh /etc/mesh
  systemctl daemon-reload
fi
echo "installed under $root"

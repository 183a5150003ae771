#!/usr/bin/env bash
# Installs a release of the mesh on this host, beside the ones already
# there, and switches to it; or switches back.
#
#   sudo deploy/install.sh [--bin-dir target/release] [--node-bin PATH] [--version V] [--with-etcd] [--root /]
#   sudo /opt/mesh/current/install.sh --rollback   # back to the release before
#   /opt/mesh/current/install.sh --list            # releases; * marks the current one
#
# A release is /opt/mesh/releases/V/: bin/, systemd/ (units and drop-ins),
# config/ (examples), gpu-host/, DEPLOY.md and this script. V is --version,
# or else the binaries' own version (`mesh-sidecar --version`) followed, in
# a git checkout, by `+` and `git describe --always --dirty` (0.1.0+9cc36dc).
# Installing V: /opt/mesh/current -> releases/V (switched atomically),
# /opt/mesh/previous -> the release it replaced; /usr/local/bin/{mesh-node,
# mesh-sidecar,meshctl} -> /opt/mesh/current/bin/...; V's units copied to
# /etc/systemd/system. --rollback swaps current and previous and reinstalls
# the units of the release it returns to. Running services keep the binary
# they started with until restarted (DEPLOY.md, "Upgrade and rollback").
#
# Configs in /etc/mesh are never overwritten: a missing one is installed;
# when the example of an existing one changed since the release being
# replaced, the new example is written beside it as NAME.new, to merge by
# hand. --with-etcd (root / only) installs Debian's etcd-server when
# /usr/bin/etcd is missing and masks its etcd.service: mesh-etcd@ runs etcd.
# --node-bin takes mesh-node from PATH instead of --bin-dir: on a GPU host,
# the CUDA build (target/cuda/release/mesh-node, scripts/build-cuda.sh).
# --root DIR puts everything under DIR (no user, systemctl or apt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin_dir="$here/../target/release"
node_bin=
root=/
version=
action=install
with_etcd=false
binaries=(mesh-node mesh-sidecar meshctl)

main() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --bin-dir) bin_dir=$2; shift 2 ;;
      --node-bin) node_bin=$2; shift 2 ;;
      --version) version=$2; shift 2 ;;
      --root) root=$2; shift 2 ;;
      --with-etcd) with_etcd=true; shift ;;
      --rollback) action=rollback; shift ;;
      --list) action=list; shift ;;
      *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
  done
  opt="$root/opt/mesh"
  case "$action" in
    install) install_release ;;
    rollback) rollback ;;
    list) list ;;
  esac
}

install_release() {
  [ -n "$version" ] || version=$(derived_version)
  case "$version" in */* | .* | "") echo "bad version: '$version'" >&2; exit 2 ;; esac
  install -d "$opt/releases" "$root/usr/local/bin" "$root/etc/systemd/system" "$root/etc/mesh/tls" \
    "$root/var/lib/mesh/models" "$root/var/lib/mesh/etcd" "$root/usr/local/share/doc/mesh"
  local replaced staged="$opt/releases/.$version.tmp"
  replaced=$(current)
  stage_release "$staged"
  install_configs "$staged/config" "$replaced"
  # Renamed into place whole; a reinstall of V replaces releases/V.
  rm -rf "$opt/releases/.$version.old"
  if [ -e "$opt/releases/$version" ]; then mv -T "$opt/releases/$version" "$opt/releases/.$version.old"; fi
  mv -T "$staged" "$opt/releases/$version"
  rm -rf "$opt/releases/.$version.old"
  if [ "$replaced" != "$version" ]; then
    [ -z "$replaced" ] || point previous "$replaced"
    point current "$version"
  fi
  for b in "${binaries[@]}"; do
    ln -sfn "../../../opt/mesh/current/bin/$b" "$root/usr/local/bin/$b"
  done
  ln -sfn "../../../../../opt/mesh/current/DEPLOY.md" "$root/usr/local/share/doc/mesh/DEPLOY.md"
  install_units "$version" "$replaced"
  if [ "$root" = / ]; then
    getent group mesh >/dev/null || groupadd --system mesh
    getent passwd mesh >/dev/null || useradd --system --gid mesh --home-dir /var/lib/mesh --shell /usr/sbin/nologin mesh
    chown -R mesh:mesh /var/lib/mesh
    chgrp -R mesh /etc/mesh
  fi
  if $with_etcd; then install_etcd; fi
  reload_systemd
  local previous
  previous=$(previous_release)
  echo "installed release $version under $root, now current${previous:+ (previous: $previous)}"
}

# The binaries' version, and the checkout's commit when there is one, so
# two builds of one crate version are two releases.
derived_version() {
  local v commit
  v=$("$bin_dir/mesh-sidecar" --version | awk '{print $2}')
  if commit=$(git -C "$here" describe --always --dirty 2>/dev/null); then v="$v+$commit"; fi
  echo "$v"
}

# Copies the release's files into directory $1.
stage_release() {
  rm -rf "$1"
  install -d "$1/bin" "$1/systemd" "$1/config"
  for b in "${binaries[@]}"; do install -m 0755 "$bin_dir/$b" "$1/bin/$b"; done
  if [ -n "$node_bin" ]; then install -m 0755 "$node_bin" "$1/bin/mesh-node"; fi
  install -m 0644 "$here"/systemd/* "$1/systemd/"
  install -m 0644 "$here"/config/* "$1/config/"
  if [ -d "$here/gpu-host" ]; then cp -r "$here/gpu-host" "$1/"; fi
  install -m 0644 "$here/DEPLOY.md" "$1/DEPLOY.md"
  install -m 0755 "$here/install.sh" "$1/install.sh"
}

# Installs the examples in $1 that /etc/mesh lacks; for an existing config
# whose example changed since release $2 (the one being replaced), writes
# the new example beside it as NAME.new.
install_configs() {
  local examples=$1 replaced=$2 f name target
  for f in "$examples"/*; do
    name=$(basename "$f")
    target="$root/etc/mesh/$name"
    if [ ! -e "$target" ]; then
      install -m 0640 "$f" "$target"
    elif ! cmp -s "$f" "$target" && ! cmp -s "$f" "$opt/releases/$replaced/config/$name"; then
      install -m 0640 "$f" "$target.new"
      echo "kept $target (it differs from release $version's example); the new example is $target.new: merge it by hand"
    fi
  done
}

# Installs release $1's units, and removes those of release $2 (the one it
# replaces) that $1 does not have: a unit renamed between releases
# (mesh-etcd.service -> mesh-etcd@.service) leaves no stale copy behind.
install_units() {
  local unit
  if [ -n "${2:-}" ] && [ -d "$opt/releases/$2/systemd" ]; then
    for unit in "$opt/releases/$2"/systemd/*.service; do
      unit=$(basename "$unit")
      [ -e "$opt/releases/$1/systemd/$unit" ] || rm -f "$root/etc/systemd/system/$unit"
    done
  fi
  install -m 0644 "$opt/releases/$1"/systemd/*.service "$root/etc/systemd/system/"
}

# Points the link $1 (current, previous) at release $2: a new link under a
# temporary name, renamed over the old one, so readers see one or the other.
point() {
  ln -sfn "releases/$2" "$opt/.$1.tmp"
  mv -T "$opt/.$1.tmp" "$opt/$1"
}

current() { link_target current; }
previous_release() { link_target previous; }
link_target() {
  if [ -L "$opt/$1" ]; then basename "$(readlink "$opt/$1")"; fi
}

rollback() {
  local from to
  from=$(current)
  to=$(previous_release)
  if [ -z "$to" ] || [ ! -d "$opt/releases/$to" ]; then
    echo "no previous release to roll back to (see --list)" >&2
    exit 1
  fi
  point current "$to"
  point previous "$from"
  install_units "$to" "$from"
  reload_systemd
  echo "rolled back from $from to $to; restart the services to run it (configs in /etc/mesh were not touched)"
}

list() {
  local cur prev v mark
  cur=$(current)
  prev=$(previous_release)
  [ -d "$opt/releases" ] || { echo "no releases under $opt" >&2; exit 1; }
  ls "$opt/releases" | sort -V | while read -r v; do
    mark=" "
    if [ "$v" = "$cur" ]; then mark="*"; fi
    if [ "$v" = "$prev" ]; then v="$v (previous)"; fi
    echo "$mark $v"
  done
}

# Debian's etcd-server brings /usr/bin/etcd and its own etcd.service, which
# would listen on 2379 beside mesh-etcd@: masked before the package can start
# it, so only mesh-etcd@ runs etcd.
install_etcd() {
  if [ "$root" != / ]; then
    echo "--with-etcd: skipped under --root (installs a package)"
    return
  fi
  systemctl disable --now etcd.service 2>/dev/null || true
  systemctl mask etcd.service
  if [ ! -x /usr/bin/etcd ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server
  fi
}

reload_systemd() {
  if [ "$root" = / ]; then systemctl daemon-reload; fi
}

main "$@"

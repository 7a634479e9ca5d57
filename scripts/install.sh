#!/usr/bin/env bash
# `make install`: the shim, the guest assets and the default configuration, in Kata's places.
#
#   $PREFIX/bin/containerd-shim-kata-v2                 the binary (target/release, `make build`)
#   /usr/share/kata-containers/{vmlinuz,initramfs.img}  the guest of `make guest-assets`
#       (GUEST_DIR): the kernel built for the job and its initramfs
#   /usr/share/defaults/kata-containers/configuration-<backend>.toml for each backend built in,
#       with ${GUEST_DIR} replaced by the directory above, and configuration.toml pointing at
#       HYPERVISOR's (the shipped default; /etc/kata-containers/configuration.toml, if an
#       administrator writes one, comes before it)
#
# Env: DESTDIR (staging root, default /), PREFIX (default /usr/local), HYPERVISOR (qemu,
# dragonball or all: which configuration is the default), GUEST_DIR (the guest to install).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
HYPERVISOR=${HYPERVISOR:-qemu}
GUEST_DIR=${GUEST_DIR:-$REPO/.cache/guest}
SHARE=/usr/share/kata-containers
DEFAULTS=/usr/share/defaults/kata-containers
BIN=$REPO/target/release/containerd-shim-kata-v2

die() { echo "install: $*" >&2; exit 1; }
[ -x "$BIN" ] || die "$BIN is missing: run make build first"
for f in vmlinuz initramfs.img; do
    [ -f "$GUEST_DIR/$f" ] || die "$GUEST_DIR/$f is missing: run make guest-assets first"
done

install -D -m 0755 "$BIN" "$DESTDIR$PREFIX/bin/containerd-shim-kata-v2"
install -D -m 0644 "$GUEST_DIR/vmlinuz" "$DESTDIR$SHARE/vmlinuz"
install -D -m 0644 "$GUEST_DIR/initramfs.img" "$DESTDIR$SHARE/initramfs.img"
backends=$("$BIN" --version | sed -n 's/^backends: //p' | tr -d ' ' | tr ',' ' ')
installed=()
for b in $backends; do
    for cfg in "$REPO"/configs/configuration-"$b"*.toml; do
        name=$(basename "$cfg")
        install -d -m 0755 "$DESTDIR$DEFAULTS"
        sed "s|\${GUEST_DIR}|$SHARE|g" "$cfg" >"$DESTDIR$DEFAULTS/$name"
        chmod 0644 "$DESTDIR$DEFAULTS/$name"
        installed+=("$DEFAULTS/$name")
    done
done
default=configuration-${HYPERVISOR/all/qemu}.toml
[ -f "$DESTDIR$DEFAULTS/$default" ] || die "no $default: the binary was built without that backend"
ln -sfn "$default" "$DESTDIR$DEFAULTS/configuration.toml"

echo "installed $PREFIX/bin/containerd-shim-kata-v2 ($("$BIN" --version | tr '\n' ' '))"
echo "installed $SHARE/vmlinuz, $SHARE/initramfs.img"
for c in "${installed[@]}"; do echo "installed $c"; done
echo "installed $DEFAULTS/configuration.toml -> $default"
[ -z "$DESTDIR" ] || echo "(under DESTDIR=$DESTDIR)"

#!/usr/bin/env bash
# Installs the Debian packages the build, tests and demo need, if any is missing.
# Idempotent and quiet when everything is present. Needs root (or sudo).
set -euo pipefail

packages=(
    qemu-system-x86              # the QEMU backend's VMM
    iproute2                     # ip: namespaces, links; tc
    containernetworking-plugins  # real CNI plugins for the endpoint tests
    kmod                         # modinfo: resolves guest kernel modules
    cpio gzip                    # initramfs
    file                         # checks the guest agent is static
    iputils-ping                 # ping from test namespaces
    ethtool                      # offload checks in the netdev tests
    util-linux                   # setpriv, nsenter
    procps                       # pgrep, ps
    gcc binutils                 # the freestanding test guest (make test-guest)
    libc6-dev                    # static link of the guest agent (crt-static)
    libseccomp-dev libcap-ng-dev # build of the Rust virtiofsd (below)
    runc                         # the host anchor of the containers benchmark; containerd's runc runtime
    containerd                   # the containerd the shim tests run privately (and its ctr)
    protobuf-compiler            # protoc: the CRI test's client (k8s-cri) generates its code when built
)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# The unprivileged user QEMU runs as with rootless = true (configs/configuration-qemu*.toml):
# a system user and group of its own, no home, no shell.
if ! getent passwd kata-qemu >/dev/null; then
    echo "install-deps: creating the system user kata-qemu"
    $sudo useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kata-qemu
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        $sudo apt-get update -q
        $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

# The virtio-fs daemon: Debian 12 has no virtiofsd package (qemu-system-common's C daemon at
# /usr/lib/qemu/virtiofsd cannot share read-only), so the maintained Rust daemon is built from
# its crate with the locked dependencies (about a minute) into /usr/local/bin, the first place
# the QEMU backend looks (`virtio_fs_daemon` unset).
VIRTIOFSD_VERSION=1.14.0
VIRTIOFSD_ROOT=${VIRTIOFSD_ROOT:-/usr/local}
have=$("$VIRTIOFSD_ROOT/bin/virtiofsd" --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$VIRTIOFSD_VERSION" ]; then
    echo "install-deps: installing virtiofsd $VIRTIOFSD_VERSION${have:+ (found $have)}"
    $sudo "${CARGO:-$(command -v cargo)}" install --locked --quiet virtiofsd \
        --version "$VIRTIOFSD_VERSION" --root "$VIRTIOFSD_ROOT"
fi

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
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

#!/usr/bin/env bash
# Builds the test guest: a Debian cloud kernel and an initramfs holding busybox,
# the virtio/vsock modules and the guest agent.
#
# Outputs (in $GUEST_DIR, default $REPO/.cache/guest, which git ignores):
#   vmlinuz         the kernel bzImage
#   initramfs.img   gzip-compressed cpio (newc) archive with /init
#   VERSION         manifest: kernel version, package names and versions, modules
#
# Steps whose outputs exist and are newer than their inputs are skipped, so a
# second run only rebuilds what changed (cargo decides for the agent itself).
#
# Nothing is installed on the host except missing tools (cpio, gzip, kmod, file):
# the kernel and busybox-static packages are downloaded and unpacked into the cache.
#
# Kernel command line understood by the guest (see the generated /init):
#   agent.port=N        vsock port the agent listens on (default 1024)
#   guest.debug_shell=1 also start a busybox shell on the console
#
# Usage: scripts/guest-assets.sh            (env: GUEST_DIR, KERNEL_PACKAGE)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_DIR=${GUEST_DIR:-$REPO/.cache/guest}
AGENT_TARGET_DIR=${AGENT_TARGET_DIR:-$REPO/target/guest}
RUST_TARGET=x86_64-unknown-linux-gnu
KERNEL_META=linux-image-cloud-amd64

# Load order that works with insmod (dependencies first).
MODULES=(
    virtio_ring virtio failover net_failover
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
    virtio_net virtio_blk
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    virtio_console
    evdev button
)

DEB_DIR=$GUEST_DIR/debs
KERNEL_ROOT=$GUEST_DIR/kernel-root
BUSYBOX_ROOT=$GUEST_DIR/busybox-root
STAGING=$GUEST_DIR/initramfs-root
AGENT_BIN=$AGENT_TARGET_DIR/$RUST_TARGET/release/guest-agent

start_ns=$(date +%s%N)
log() { printf 'guest-assets: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when $1 is missing or older than any of the remaining paths.
stale() {
    local out=$1; shift
    [[ -e $out ]] || return 0
    local input
    for input in "$@"; do
        [[ $input -nt $out ]] && return 0
    done
    return 1
}

ensure_tools() {
    local -A need=([cpio]=cpio [gzip]=gzip [modinfo]=kmod [depmod]=kmod [file]=file [dpkg-deb]=dpkg)
    local missing=() tool
    for tool in "${!need[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing missing tools: ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

# Prints the concrete kernel package the metapackage depends on.
resolve_kernel_package() {
    if [[ -n ${KERNEL_PACKAGE:-} ]]; then
        echo "$KERNEL_PACKAGE"
        return
    fi
    local pkg
    pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    if [[ -z $pkg ]]; then
        apt-get update >/dev/null
        pkg=$(apt-cache depends "$KERNEL_META" |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    fi
    [[ -n $pkg ]] || die "cannot resolve the package behind $KERNEL_META"
    echo "$pkg"
}

# Downloads package $1 into $DEB_DIR unless a .deb of it is already there;
# prints the .deb path.
download_deb() {
    local pkg=$1 deb
    deb=$(compgen -G "$DEB_DIR/${pkg}_*.deb" | head -n1 || true)
    if [[ -z $deb ]]; then
        log "downloading $pkg"
        if ! (cd "$DEB_DIR" && apt-get download "$pkg" >/dev/null 2>&1); then
            log "download failed; refreshing package lists"
            apt-get update >/dev/null
            (cd "$DEB_DIR" && apt-get download "$pkg" >/dev/null)
        fi
        deb=$(compgen -G "$DEB_DIR/${pkg}_*.deb" | head -n1) || die "no .deb for $pkg"
    fi
    echo "$deb"
}

# Unpacks $1 (.deb) into directory $2 when the deb is newer than the last unpack.
extract_deb() {
    local deb=$1 root=$2
    if stale "$root/.extracted" "$deb"; then
        log "unpacking $(basename "$deb")"
        rm -rf "$root"
        mkdir -p "$root"
        dpkg-deb -x "$deb" "$root"
        # Debian generates modules.dep at install time; do it here so modinfo works.
        if [[ -d $root/lib/modules ]]; then
            local kver
            for kver in "$root"/lib/modules/*/; do
                depmod -b "$root" "$(basename "$kver")"
            done
        fi
        touch "$root/.extracted"
    fi
}

build_agent() {
    log "building guest-agent (static, $RUST_TARGET)"
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$AGENT_TARGET_DIR" \
        CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --quiet --release -p guest-agent --target "$RUST_TARGET")
    [[ -x $AGENT_BIN ]] || die "cargo did not produce $AGENT_BIN"
    local kind
    kind=$(file -b "$AGENT_BIN")
    [[ $kind == *"statically linked"* || $kind == *"static-pie linked"* ]] ||
        die "guest-agent is not static: $kind"
}

# Prints the path of module $1 in the unpacked kernel.
module_path() {
    local name=$1 path
    path=$(modinfo -k "$KVER" -b "$KERNEL_ROOT" -n "$name" 2>/dev/null || true)
    if [[ -z $path || ! -e $path ]]; then
        path=$(find "$KERNEL_ROOT/lib/modules/$KVER" -name "$name.ko*" -print -quit)
    fi
    [[ -n $path ]] || die "module $name not found for $KVER"
    echo "$path"
}

write_init() {
    cat >"$1" <<'EOF'
#!/bin/sh
# /init of the test guest: mount the kernel file systems, load the virtio and
# vsock modules, bring lo up, print the ready marker and run the guest agent.
# The agent is the long-running process; when it exits, the guest powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "guest-init: insmod $module failed"
done </lib/modules/load-order

ip link set lo up
hostname guest

# The ACPI power button (QMP system_powerdown) powers the guest off at once.
acpid -c /etc/acpi -l /dev/null -p /run/acpid.pid

for arg in $(cat /proc/cmdline); do
    case "$arg" in
    guest.debug_shell=1) setsid cttyhack sh </dev/console >/dev/console 2>&1 & ;;
    esac
done

echo "guest-init: ready"
/sbin/guest-agent
echo "guest-init: guest-agent exited with status $?, powering off"
poweroff -f
EOF
    chmod 0755 "$1"
}

build_initramfs() {
    local out=$GUEST_DIR/initramfs.img
    local inputs=("$AGENT_BIN" "$BUSYBOX_ROOT/.extracted" "$KERNEL_ROOT/.extracted" "${BASH_SOURCE[0]}")
    if ! stale "$out" "${inputs[@]}"; then
        log "initramfs is up to date"
        return
    fi
    log "building initramfs"
    local step_ns
    step_ns=$(date +%s%N)
    rm -rf "$STAGING"
    mkdir -p "$STAGING"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,lib/modules}

    install -m 0755 "$BUSYBOX_ROOT/bin/busybox" "$STAGING/bin/busybox"
    local applet
    while read -r applet; do
        [[ $applet == bin/busybox || -e $STAGING/$applet ]] && continue
        ln -s /bin/busybox "$STAGING/$applet"
    done < <("$STAGING/bin/busybox" --list-full)

    install -m 0755 "$AGENT_BIN" "$STAGING/sbin/guest-agent"

    local name src dst
    : >"$STAGING/lib/modules/load-order"
    for name in "${MODULES[@]}"; do
        src=$(module_path "$name")
        dst=$STAGING/lib/modules/$name.ko
        case $src in
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
        esac
        echo "$name" >>"$STAGING/lib/modules/load-order"
    done

    write_init "$STAGING/init"
    mkdir -p "$STAGING/etc/acpi/PWRF"
    printf '#!/bin/sh\npoweroff -f\n' >"$STAGING/etc/acpi/PWRF/00000080"
    chmod 0755 "$STAGING/etc/acpi/PWRF/00000080"
    echo "root:x:0:0:root:/root:/bin/sh" >"$STAGING/etc/passwd"

    (cd "$STAGING" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc --owner=0:0 --reproducible | gzip -6n) >"$out.tmp"
    mv "$out.tmp" "$out"
    log "initramfs built in $((($(date +%s%N) - step_ns) / 1000000)) ms ($(du -k "$out" | cut -f1) KiB)"
}

write_manifest() {
    local out=$GUEST_DIR/VERSION tmp
    tmp=$(mktemp "$GUEST_DIR/.VERSION.XXXXXX")
    chmod 0644 "$tmp"
    {
        echo "KERNEL_VERSION=$KVER"
        echo "KERNEL_PACKAGE=$KERNEL_PKG"
        echo "KERNEL_PACKAGE_VERSION=$(dpkg-deb -f "$KERNEL_DEB" Version)"
        echo "BUSYBOX_PACKAGE_VERSION=$(dpkg-deb -f "$BUSYBOX_DEB" Version)"
        echo "MODULES=${MODULES[*]}"
        echo "AGENT_SHA256=$(sha256sum "$AGENT_BIN" | cut -d' ' -f1)"
    } >"$tmp"
    if cmp -s "$tmp" "$out"; then rm -f "$tmp"; else mv "$tmp" "$out"; fi
}

main() {
    mkdir -p "$DEB_DIR"
    ensure_tools

    KERNEL_PKG=$(resolve_kernel_package)
    KVER=${KERNEL_PKG#linux-image-}
    KERNEL_DEB=$(download_deb "$KERNEL_PKG")
    BUSYBOX_DEB=$(download_deb busybox-static)
    extract_deb "$KERNEL_DEB" "$KERNEL_ROOT"
    extract_deb "$BUSYBOX_DEB" "$BUSYBOX_ROOT"

    local bzimage=$KERNEL_ROOT/boot/vmlinuz-$KVER
    [[ -f $bzimage ]] || die "no $bzimage in $KERNEL_DEB"
    if stale "$GUEST_DIR/vmlinuz" "$bzimage"; then
        # Copy then rename, so a VM starting meanwhile never reads half a file.
        cp "$bzimage" "$GUEST_DIR/vmlinuz.tmp"
        mv "$GUEST_DIR/vmlinuz.tmp" "$GUEST_DIR/vmlinuz"
    fi

    build_agent
    build_initramfs
    write_manifest

    local elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
    log "kernel $KVER; $GUEST_DIR/{vmlinuz,initramfs.img,VERSION} ready in ${elapsed_ms} ms"
}

main "$@"

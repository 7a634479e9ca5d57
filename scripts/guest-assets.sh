#!/usr/bin/env bash
# Builds the guest: a kernel and an initramfs holding busybox and the guest agent.
#
# The kernel (GUEST_KERNEL):
#   built    (default) built for the job by scripts/guest-kernel.sh from Debian's
#            linux-source package: virtio, vsock, virtio-fs, overlay, vmgenid built in,
#            no modules. A guest boots about 20% faster with it than with the packaged
#            kernel, and QEMU holds about 60 MiB less (BENCHMARKS.md). From nothing the
#            build takes about 6 minutes on 2 cores; its tree is kept in KERNEL_BUILD_DIR
#            (default $REPO/.cache/kernel-build) and rebuilt only where something changed.
#   debian   Debian's packaged cloud kernel (linux-image-cloud-amd64), with the virtio,
#            vsock, virtio-fs and overlay modules in the initramfs, loaded by /init. The
#            benchmarks boot it as the alternative (make guest-assets-debian puts it in
#            .cache/guest-debian).
#
# Outputs (in $GUEST_DIR, default $REPO/.cache/guest, which git ignores):
#   vmlinuz         the kernel bzImage
#   vmlinux         the uncompressed kernel (built only: PVH boot and Dragonball)
#   config          the kernel's build configuration
#   initramfs.img   uncompressed cpio (newc) archive with /init (under TCG the guest
#                   spent about 0.5 s of CPU inflating a gzip one; QEMU loads 7 MB at once)
#   rootfs/         a busybox root filesystem directory (busybox-static, its applet links,
#                   /etc/passwd and group, empty proc, sys, dev, tmp...): the image of the
#                   containers `sandbox exec` runs and the tests use
#   VERSION         manifest: what the outputs were built from (kernel source or kernel
#                   and busybox package names, versions and .deb digests, module list,
#                   agent and script digests) and the digests of the outputs themselves
#                   (the rootfs's: of its sorted listing with modes and link targets, and
#                   of busybox)
#
# Freshness is decided by content, never by mtimes (`dpkg-deb -x` keeps a package's
# own mtimes): the packages apt resolves now are downloaded at exactly that version,
# and when any input of the manifest differs from the recorded one, or an output no
# longer matches its recorded digest, the kernel and the initramfs are rebuilt together
# from one kernel source or package. Before they replace the old ones, the bzImage's
# version string (and every module's vermagic) is checked against the kernel version of
# that source or package. (cargo decides for the agent itself.)
#
# Nothing is installed on the host except missing tools (cpio, gzip, kmod, file, and the
# kernel's build tools): the kernel source, kernel and busybox-static packages are
# downloaded and unpacked into the cache.
#
# Kernel command line understood by the guest (see the generated /init):
#   agent.port=N        vsock port the agent listens on (default 1024)
#   guest.debug_shell=1 also start a busybox shell on the console
#
# Usage: scripts/guest-assets.sh
#   env: GUEST_DIR, GUEST_KERNEL (built|debian), KERNEL_BUILD_DIR, JOBS,
#        KERNEL_SOURCE_PACKAGE (built: instead of what linux-source depends on),
#        KERNEL_PACKAGE (debian: instead of what linux-image-cloud-amd64 depends on)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_DIR=${GUEST_DIR:-$REPO/.cache/guest}
AGENT_TARGET_DIR=${AGENT_TARGET_DIR:-$REPO/target/guest}
RUST_TARGET=x86_64-unknown-linux-gnu
GUEST_KERNEL=${GUEST_KERNEL:-built}
KERNEL_BUILD_DIR=${KERNEL_BUILD_DIR:-$REPO/.cache/kernel-build}
KERNEL_META=linux-image-cloud-amd64
SOURCE_META=linux-source

# Modules of the packaged kernel in a load order that works with insmod (dependencies
# first). The built kernel has them built in.
DEBIAN_MODULES=(
    virtio_ring virtio failover net_failover
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
    virtio_net virtio_blk
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    virtio_console virtio_balloon
    fuse virtiofs overlay
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

sha256() { sha256sum "$1" | cut -d' ' -f1; }
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

# Prints the concrete package metapackage $1 depends on whose name starts with $2 and a
# digit (linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64, linux-source ->
# linux-source-6.1).
resolve_package() {
    local meta=$1 prefix=$2 pkg
    pkg=$(apt-cache depends "$meta" 2>/dev/null |
        awk -v p="^$prefix[0-9]" '$1 == "Depends:" && $2 ~ p { print $2; exit }')
    if [[ -z $pkg ]]; then
        apt-get update >/dev/null
        pkg=$(apt-cache depends "$meta" |
            awk -v p="^$prefix[0-9]" '$1 == "Depends:" && $2 ~ p { print $2; exit }')
    fi
    [[ -n $pkg ]] || die "cannot resolve the package behind $meta"
    echo "$pkg"
}

# Prints the version of package $1 that apt would install now (refreshing the
# package lists once if it knows none).
candidate_version() {
    local pkg=$1 v
    v=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
    if [[ -z $v || $v == "(none)" ]]; then
        apt-get update >/dev/null
        v=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2; exit }')
    fi
    [[ -n $v && $v != "(none)" ]] || die "apt knows no installable version of $pkg"
    echo "$v"
}

# Downloads version $2 of package $1 into $DEB_DIR unless that exact .deb is there,
# removes other versions of it, and prints the .deb path.
download_deb() {
    local pkg=$1 version=$2 deb old
    # apt-get download writes the epoch's ':' as %3a.
    deb=$(compgen -G "$DEB_DIR/${pkg}_${version//:/%3a}_*.deb" | head -n1 || true)
    if [[ -z $deb ]]; then
        log "downloading $pkg $version"
        if ! (cd "$DEB_DIR" && apt-get download "$pkg=$version" >/dev/null 2>&1); then
            log "download failed; refreshing package lists"
            apt-get update >/dev/null
            (cd "$DEB_DIR" && apt-get download "$pkg=$version" >/dev/null)
        fi
        deb=$(compgen -G "$DEB_DIR/${pkg}_${version//:/%3a}_*.deb" | head -n1) ||
            die "apt-get download $pkg=$version left no .deb in $DEB_DIR"
    fi
    for old in "$DEB_DIR/${pkg}"_*.deb; do
        [[ $old == "$deb" ]] || rm -f "$old"
    done
    echo "$deb"
}

# Unpacks $1 (.deb) into directory $2 unless that very .deb (by digest) is what the
# directory holds.
extract_deb() {
    local deb=$1 root=$2 digest
    digest=$(sha256 "$deb")
    if [[ $(cat "$root/.extracted" 2>/dev/null) != "$digest" ]]; then
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
        echo "$digest" >"$root/.extracted"
    fi
}

build_agent() {
    log "building guest-agent (static, $RUST_TARGET, with the container runtime)"
    (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$AGENT_TARGET_DIR" \
        CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --quiet --release -p guest-agent --features runtime --target "$RUST_TARGET")
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

# A guest that cannot serve says why on the console (the host reports this line) and
# powers off at once, rather than looking ready to a host that then waits for an agent.
fail() {
    echo "guest-init: error: $*"
    poweroff -f
    sleep 5
    exit 1
}

while read -r module; do
    if ! out=$(insmod "/lib/modules/$module.ko" 2>&1); then
        why=$(dmesg | grep -F "$module" | tail -n 1 | sed 's/^\[[^]]*\] *//')
        fail "module $module did not load: ${out:-insmod failed}${why:+; kernel: $why}"
    fi
done </lib/modules/load-order
[ -x /sbin/guest-agent ] || fail "/sbin/guest-agent is missing"

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
status=$?
[ "$status" -eq 0 ] || fail "guest-agent exited with status $status"
echo "guest-init: guest-agent exited, powering off"
poweroff -f
EOF
    chmod 0755 "$1"
}

# Builds the initramfs into $1.
build_initramfs() {
    local out=$1
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
    for name in ${MODULES[@]+"${MODULES[@]}"}; do
        src=$(module_path "$name")
        dst=$STAGING/lib/modules/$name.ko
        case $src in
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
        esac
        echo "$name" >>"$STAGING/lib/modules/load-order"
        check_vermagic "$dst" "$name"
    done

    write_init "$STAGING/init"
    mkdir -p "$STAGING/etc/acpi/PWRF"
    printf '#!/bin/sh\npoweroff -f\n' >"$STAGING/etc/acpi/PWRF/00000080"
    chmod 0755 "$STAGING/etc/acpi/PWRF/00000080"
    echo "root:x:0:0:root:/root:/bin/sh" >"$STAGING/etc/passwd"

    (cd "$STAGING" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc --owner=0:0 --reproducible) >"$out"
    log "initramfs built in $((($(date +%s%N) - step_ns) / 1000000)) ms ($(du -k "$out" | cut -f1) KiB)"
}

# Builds the container root filesystem directory $1 from the unpacked busybox-static.
build_rootfs() {
    local out=$1 applet
    log "building the container rootfs"
    rm -rf "$out"
    mkdir -p "$out"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,root,var}
    chmod 1777 "$out/tmp"
    install -m 0755 "$BUSYBOX_ROOT/bin/busybox" "$out/bin/busybox"
    while read -r applet; do
        [[ $applet == bin/busybox || -e $out/$applet ]] && continue
        ln -s /bin/busybox "$out/$applet"
    done < <("$out/bin/busybox" --list-full)
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$out/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$out/etc/group"
}

# Prints the digest of root filesystem directory $1: its sorted listing (path, type, mode,
# link target) and busybox's digest.
rootfs_digest() {
    { (cd "$1" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort); sha256 "$1/bin/busybox"; } |
        sha256sum | cut -d' ' -f1
}

# Fails unless module file $1 (named $2) was built for kernel $KVER.
check_vermagic() {
    local magic
    magic=$(modinfo -F vermagic "$1")
    [[ $magic == "$KVER "* ]] ||
        die "module $2 is built for ${magic%% *}, not for kernel $KVER of $KERNEL_PKG: its package and the kernel's disagree"
}

# Fails unless bzImage $1 is kernel $KVER.
check_kernel() {
    local what
    what=$(file -b "$1")
    [[ $what == *"version $KVER "* ]] ||
        die "$1 is not kernel $KVER ($KERNEL_PKG $KERNEL_PKG_VERSION): file says: $what"
}

# Prints the inputs part of the manifest: everything the outputs are built from.
inputs_manifest() {
    echo "GUEST_KERNEL=$GUEST_KERNEL"
    echo "KERNEL_VERSION=$KVER"
    if [[ $GUEST_KERNEL == built ]]; then
        echo "KERNEL_SOURCE_PACKAGE=$KERNEL_PKG"
        echo "KERNEL_SOURCE_VERSION=$KERNEL_PKG_VERSION"
        echo "KERNEL_SOURCE_DEB_SHA256=$(sha256 "$KERNEL_DEB")"
        echo "KERNEL_BUILD_SCRIPT_SHA256=$(sha256 "$REPO/scripts/guest-kernel.sh")"
    else
        echo "KERNEL_PACKAGE=$KERNEL_PKG"
        echo "KERNEL_PACKAGE_VERSION=$KERNEL_PKG_VERSION"
        echo "KERNEL_DEB_SHA256=$(sha256 "$KERNEL_DEB")"
    fi
    echo "BUSYBOX_PACKAGE_VERSION=$BUSYBOX_VERSION"
    echo "BUSYBOX_DEB_SHA256=$(sha256 "$BUSYBOX_DEB")"
    echo "MODULES=${MODULES[*]-}"
    echo "AGENT_SHA256=$(sha256 "$AGENT_BIN")"
    echo "SCRIPT_SHA256=$(sha256 "${BASH_SOURCE[0]}")"
}

# The kernel files among the outputs, as "MANIFEST_KEY file" lines.
kernel_outputs() {
    echo "VMLINUZ vmlinuz"
    [[ $GUEST_KERNEL == built ]] && echo "VMLINUX vmlinux"
    echo "CONFIG config"
    echo "INITRAMFS initramfs.img"
}

# Prints the outputs part of the manifest.
outputs_manifest() {
    local key file
    while read -r key file; do
        echo "${key}_OUTPUT_SHA256=$(sha256 "$GUEST_DIR/$file")"
    done < <(kernel_outputs)
    echo "ROOTFS_OUTPUT_SHA256=$(rootfs_digest "$GUEST_DIR/rootfs")"
}

# True when VERSION records exactly these inputs and every output still matches its
# recorded digest.
up_to_date() {
    local manifest=$GUEST_DIR/VERSION key file
    [[ -f $manifest && -x $GUEST_DIR/rootfs/bin/busybox ]] || return 1
    while read -r key file; do
        [[ -f $GUEST_DIR/$file ]] || return 1
    done < <(kernel_outputs)
    [[ $(grep -v '_OUTPUT_SHA256=' "$manifest") == "$1" ]] || return 1
    [[ $(grep '_OUTPUT_SHA256=' "$manifest") == "$(outputs_manifest)" ]]
}

# Tells which recorded input differs from the current ones (for the log).
what_changed() {
    local manifest=$GUEST_DIR/VERSION
    [[ -f $manifest ]] || { echo "no manifest yet"; return; }
    local changed
    changed=$(diff <(grep -v '_OUTPUT_SHA256=' "$manifest") <(echo "$1") |
        sed -n 's/^> \([A-Z0-9_]*\)=.*/\1/p' | tr '\n' ' ')
    echo "${changed% }"
    [[ -n $changed ]] || echo "an output no longer matches its recorded digest"
}

# Prints the upstream version of Debian version $1 (6.1.172-1 -> 6.1.172).
upstream_version() {
    local v=${1#*:}
    echo "${v%-*}"
}

# Sets the kernel inputs: KERNEL_PKG, KERNEL_PKG_VERSION, KERNEL_DEB, KVER, MODULES.
resolve_kernel() {
    case $GUEST_KERNEL in
    built)
        KERNEL_PKG=${KERNEL_SOURCE_PACKAGE:-$(resolve_package "$SOURCE_META" linux-source-)}
        KERNEL_PKG_VERSION=$(candidate_version "$KERNEL_PKG")
        KVER=$(upstream_version "$KERNEL_PKG_VERSION")
        MODULES=()
        ;;
    debian)
        KERNEL_PKG=${KERNEL_PACKAGE:-$(resolve_package "$KERNEL_META" linux-image-)}
        KERNEL_PKG_VERSION=$(candidate_version "$KERNEL_PKG")
        KVER=${KERNEL_PKG#linux-image-}
        MODULES=("${DEBIAN_MODULES[@]}")
        ;;
    esac
    KERNEL_DEB=$(download_deb "$KERNEL_PKG" "$KERNEL_PKG_VERSION")
}

# Writes the kernel files to $GUEST_DIR/*.tmp: vmlinuz, config and (built) vmlinux.
stage_kernel() {
    local bzimage config
    if [[ $GUEST_KERNEL == built ]]; then
        local release
        release=$("$REPO/scripts/guest-kernel.sh" "$KERNEL_DEB" "$KERNEL_BUILD_DIR")
        [[ $release == "$KVER" ]] ||
            die "$KERNEL_PKG $KERNEL_PKG_VERSION built kernel release $release, not $KVER"
        bzimage=$KERNEL_BUILD_DIR/arch/x86/boot/bzImage
        config=$KERNEL_BUILD_DIR/.config
        cp "$KERNEL_BUILD_DIR/vmlinux" "$GUEST_DIR/vmlinux.tmp"
    else
        extract_deb "$KERNEL_DEB" "$KERNEL_ROOT"
        bzimage=$KERNEL_ROOT/boot/vmlinuz-$KVER
        config=$KERNEL_ROOT/boot/config-$KVER
        [[ -f $bzimage ]] || die "no $bzimage in $KERNEL_DEB"
    fi
    check_kernel "$bzimage"
    cp "$bzimage" "$GUEST_DIR/vmlinuz.tmp"
    cp "$config" "$GUEST_DIR/config.tmp"
}

main() {
    [[ $GUEST_KERNEL == built || $GUEST_KERNEL == debian ]] ||
        die "GUEST_KERNEL=$GUEST_KERNEL: it is built (a kernel for the job, the default) or debian (Debian's packaged cloud kernel)"
    mkdir -p "$DEB_DIR"
    ensure_tools

    resolve_kernel
    BUSYBOX_VERSION=$(candidate_version busybox-static)
    BUSYBOX_DEB=$(download_deb busybox-static "$BUSYBOX_VERSION")
    build_agent
    extract_deb "$BUSYBOX_DEB" "$BUSYBOX_ROOT"

    local inputs
    inputs=$(inputs_manifest)
    if up_to_date "$inputs"; then
        log "kernel $KVER ($GUEST_KERNEL, $KERNEL_PKG $KERNEL_PKG_VERSION): $GUEST_DIR is up to date"
        return
    fi
    log "rebuilding: $(what_changed "$inputs")"

    # The outputs are made aside and checked, then replace the old ones together, with
    # the manifest last: a VM starting meanwhile never reads half a file, and an
    # interrupted run leaves a manifest that does not match, so the next run rebuilds.
    rm -f "$GUEST_DIR/VERSION"
    stage_kernel
    build_initramfs "$GUEST_DIR/initramfs.img.tmp"
    build_rootfs "$GUEST_DIR/rootfs.tmp"
    local key file
    while read -r key file; do
        mv "$GUEST_DIR/$file.tmp" "$GUEST_DIR/$file"
    done < <(kernel_outputs)
    # Nothing of a kernel of the other kind stays behind.
    if [[ $GUEST_KERNEL == built ]]; then
        rm -rf "$KERNEL_ROOT"
    else
        rm -f "$GUEST_DIR/vmlinux"
    fi
    # A directory cannot be renamed over a non-empty one: the old one goes first.
    rm -rf "$GUEST_DIR/rootfs"
    mv "$GUEST_DIR/rootfs.tmp" "$GUEST_DIR/rootfs"
    {
        echo "$inputs"
        outputs_manifest
    } >"$GUEST_DIR/VERSION.tmp"
    mv "$GUEST_DIR/VERSION.tmp" "$GUEST_DIR/VERSION"

    local elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
    log "kernel $KVER ($GUEST_KERNEL, $KERNEL_PKG $KERNEL_PKG_VERSION); $GUEST_DIR/{$(kernel_outputs | cut -d' ' -f2 | paste -sd,),rootfs,VERSION} built in ${elapsed_ms} ms"
}

main "$@"

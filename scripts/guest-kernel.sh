#!/usr/bin/env bash
# Builds the guest kernel for the job, as Kata does for its guests, from the source in a
# Debian linux-source .deb (downloaded by scripts/guest-assets.sh, never installed):
# x86_64_defconfig without what a VM guest never has or needs (module loading, ATA/SCSI,
# USB, sound, graphics, wireless, Ethernet NIC drivers, ...: each of them costs the boot its
# probes and initcalls), plus what a sandbox guest needs built in: virtio over PCI and MMIO
# (with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, for Dragonball's virtio-mmio devices given on
# the kernel command line), virtio-net, -blk, -console, -balloon (free page reporting),
# vsock over virtio, virtio-fs (FUSE), overlayfs, PCIe hotplug, vmgenid, and devtmpfs
# mounted by the kernel.
#
# The build tree is kept in BUILD_DIR and reused while it was unpacked from the same .deb:
# make then rebuilds only what changed (seconds when nothing did). From nothing it takes
# about 6 minutes on 2 cores. The tree is locked while in use (flock), so that two guest
# directories built at once do not write it together.
#
# Leaves arch/x86/boot/bzImage, vmlinux and .config in BUILD_DIR and prints the kernel
# release (`make kernelrelease`) on stdout; logs go to stderr.
#
# Usage: scripts/guest-kernel.sh LINUX_SOURCE_DEB BUILD_DIR     (env: JOBS)
set -euo pipefail

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

(($# == 2)) || die "usage: $0 LINUX_SOURCE_DEB BUILD_DIR"
DEB=$1
BUILD=$2
JOBS=${JOBS:-$(nproc)}

# Options set to y on top of x86_64_defconfig.
BUILTIN=(
    VIRTIO VIRTIO_MENU VIRTIO_PCI VIRTIO_PCI_LEGACY VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES
    VIRTIO_NET VIRTIO_BLK VIRTIO_CONSOLE VIRTIO_BALLOON PAGE_REPORTING
    VSOCKETS VIRTIO_VSOCKETS VIRTIO_VSOCKETS_COMMON
    FUSE_FS VIRTIO_FS OVERLAY_FS
    PCI PCIEPORTBUS HOTPLUG_PCI HOTPLUG_PCI_PCIE HOTPLUG_PCI_ACPI
    ACPI ACPI_BUTTON INPUT_EVDEV VIRT_DRIVERS VMGENID
    DEVTMPFS DEVTMPFS_MOUNT BLK_DEV_INITRD TMPFS
    SERIAL_8250 SERIAL_8250_CONSOLE
    PVH
)

# Options turned off on top of x86_64_defconfig.
WITHOUT=(
    MODULES ATA SCSI USB_SUPPORT SOUND DRM AGP FB HID
    WLAN WIRELESS CFG80211 RFKILL ETHERNET
    INPUT_MOUSE INPUT_JOYSTICK INPUT_TABLET INPUT_TOUCHSCREEN
    MD NETWORK_FILESYSTEMS PCCARD HIBERNATION SUSPEND MICROCODE
    WATCHDOG LOGO
)

install_missing() {
    local -A need=([make]=make [gcc]=gcc [bc]=bc [bison]=bison [flex]=flex [xz]=xz-utils [flock]=util-linux)
    local missing=() tool
    for tool in "${!need[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
    done
    [[ -e /usr/include/libelf.h ]] || missing+=(libelf-dev)
    [[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
    ((${#missing[@]} == 0)) && return 0
    log "installing build tools: ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

# Unpacks the source tarball the .deb carries (usr/src/linux-source-*.tar.xz) into $BUILD,
# unless the tree there came from this very .deb.
unpack() {
    local digest tarball
    digest=$(sha256sum "$DEB" | cut -d' ' -f1)
    [[ $(cat "$BUILD/.unpacked-from" 2>/dev/null) == "$digest" ]] && return 0
    tarball=$(dpkg-deb -c "$DEB" | awk '{ print $NF }' | grep -E '^\./usr/src/linux-source-[^/]*\.tar\.xz$' | head -n1) ||
        die "$DEB carries no usr/src/linux-source-*.tar.xz: is it a linux-source package?"
    log "unpacking ${tarball#./usr/src/} from $(basename "$DEB") into $BUILD"
    find "$BUILD" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
    dpkg-deb --fsys-tarfile "$DEB" | tar -xO "$tarball" | tar -xJ -C "$BUILD" --strip-components=1
    echo "$digest" >"$BUILD/.unpacked-from"
}

configure() {
    make -s x86_64_defconfig
    local option
    for option in "${BUILTIN[@]}"; do
        scripts/config --enable "$option"
    done
    for option in "${WITHOUT[@]}"; do
        scripts/config --disable "$option"
    done
    make -s olddefconfig
    for option in "${WITHOUT[@]}"; do
        ! grep -qx "CONFIG_$option=[ym]" .config ||
            die "CONFIG_$option is still on (something selects it; see $BUILD/.config)"
    done
    for option in "${BUILTIN[@]}"; do
        grep -qx "CONFIG_$option=y" .config ||
            die "CONFIG_$option did not end up built in (check its dependencies in $BUILD/.config)"
    done
}

[[ -f $DEB ]] || die "$DEB does not exist"
install_missing
mkdir -p "$BUILD"
exec 9>"$BUILD/.lock"
flock 9
unpack
cd "$BUILD"
# Configured every time: kbuild tracks each option, so an unchanged one rebuilds nothing.
configure
release=$(make -s kernelrelease)
log "building $release with $JOBS jobs"
began=$(date +%s)
make -s -j"$JOBS" bzImage vmlinux >&2
log "$release built in $(($(date +%s) - began)) s: $BUILD/{arch/x86/boot/bzImage,vmlinux,.config}"
echo "$release"

#!/usr/bin/env bash
# Builds a guest kernel for the job, as Kata does for its guests: Debian's linux-source
# package, x86_64_defconfig without what a VM guest never has or needs (module loading,
# ATA/SCSI, USB, sound, graphics, wireless, Ethernet NIC drivers, ...: each of them costs
# the boot its probes and initcalls), plus what a sandbox guest needs built in:
# virtio over PCI and MMIO (with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, for Dragonball's
# virtio-mmio devices given on the kernel command line), virtio-net, -blk, -console, -balloon
# (free page reporting), vsock over virtio, virtio-fs (FUSE), overlayfs, PCIe hotplug, and
# devtmpfs mounted by the kernel.
#
# Outputs (in $GUEST_DIR/kernel-custom): vmlinuz (bzImage), vmlinux (for PVH and Dragonball),
# config, and initramfs.img: the initramfs of `make guest-assets` without the Debian kernel's
# modules (its init loads what lib/modules/load-order lists, here nothing). Boot it with
#   kernel = "${GUEST_DIR}/kernel-custom/vmlinuz"
#   initrd = "${GUEST_DIR}/kernel-custom/initramfs.img"
# The qemu_boot bench boots it beside the default guest when it is there.
#
# From nothing it takes about 6 minutes on 2 cores. `make guest-assets` stays on Debian's
# packaged kernel for now (its checks are built around the packaged kernel and its modules).
#
# Usage: scripts/guest-kernel.sh            (env: GUEST_DIR, JOBS)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_DIR=${GUEST_DIR:-$REPO/.cache/guest}
OUT=$GUEST_DIR/kernel-custom
BUILD=$OUT/build
JOBS=${JOBS:-$(nproc)}

log() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

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
    local -A need=([make]=make [gcc]=gcc [bc]=bc [bison]=bison [flex]=flex [xz]=xz-utils)
    local missing=() tool
    for tool in "${!need[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
    done
    [[ -e /usr/include/libelf.h ]] || missing+=(libelf-dev)
    [[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
    if ! compgen -G '/usr/src/linux-source-*.tar.xz' >/dev/null; then
        missing+=(linux-source)
    fi
    ((${#missing[@]} == 0)) && return 0
    log "installing: ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

install_missing
tarball=$(compgen -G '/usr/src/linux-source-*.tar.xz' | sort -V | tail -1)
[[ -n $tarball ]] || die "no /usr/src/linux-source-*.tar.xz after installing linux-source"
version=$(basename "$tarball" .tar.xz)
log "building $version in $BUILD with $JOBS jobs"

# A tree unpacked from the same tarball is reused: make rebuilds only what changed.
stamp="$(basename "$tarball") $(stat -c '%s %Y' "$tarball")"
if [[ $(cat "$BUILD/.unpacked-from" 2>/dev/null) != "$stamp" ]]; then
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    tar -xJf "$tarball" -C "$BUILD" --strip-components=1
    echo "$stamp" >"$BUILD/.unpacked-from"
fi

cd "$BUILD"
make -s x86_64_defconfig
for option in "${BUILTIN[@]}"; do
    scripts/config --enable "$option"
done
for option in "${WITHOUT[@]}"; do
    scripts/config --disable "$option"
done
make -s olddefconfig
for option in "${WITHOUT[@]}"; do
    ! grep -qx "CONFIG_$option=[ym]" .config || die "CONFIG_$option is still on (something selects it; see $BUILD/.config)"
done
for option in "${BUILTIN[@]}"; do
    grep -qx "CONFIG_$option=y" .config || die "CONFIG_$option did not end up built in (check its dependencies in $BUILD/.config)"
done

base=$GUEST_DIR/initramfs.img
[[ -f $base ]] || die "$base is missing: run make guest-assets first"

make -s -j"$JOBS" bzImage vmlinux
install -m 0644 arch/x86/boot/bzImage "$OUT/vmlinuz.tmp"
install -m 0644 vmlinux "$OUT/vmlinux.tmp"
install -m 0644 .config "$OUT/config.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
mv "$OUT/config.tmp" "$OUT/config"

# The guest's initramfs without modules: this kernel has what they provide built in.
root=$OUT/initramfs-root
rm -rf "$root"
mkdir -p "$root"
(cd "$root" && cpio -id --quiet <"$base")
rm -f "$root"/lib/modules/*.ko
: >"$root/lib/modules/load-order"
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --quiet --null -o -H newc --owner=0:0 --reproducible) >"$OUT/initramfs.img.tmp"
mv "$OUT/initramfs.img.tmp" "$OUT/initramfs.img"
rm -rf "$root"
log "$version: $OUT/{vmlinuz,vmlinux,config,initramfs.img}"

//! The guest assets `scripts/guest-assets.sh` builds: the default guest's kernel built for
//! the job from Debian's kernel source, without modules; both kinds rebuilt from their
//! content, never a kernel from one source or package beside an initramfs from another; and
//! a guest whose modules do not match its kernel (Debian's packaged kernel) fails its boot at
//! once, naming the module.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use workspace_tests::qemu::Qemu;
use workspace_tests::{require_root, run, Backend, GuestAssets, Sandbox};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// The two kinds of guest kernel `scripts/guest-assets.sh` makes (`GUEST_KERNEL`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Built for the job from Debian's linux-source (`make guest-assets`).
    Built,
    /// Debian's packaged cloud kernel and its modules (`make guest-assets-debian`).
    Debian,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Built => "built",
            Kind::Debian => "debian",
        }
    }

    fn assets(self) -> GuestAssets {
        match self {
            Kind::Built => GuestAssets::find(),
            Kind::Debian => GuestAssets::debian(),
        }
    }
}

/// A guest directory of its own, seeded with the packages `make guest-assets` (or `make
/// guest-assets-debian`) downloaded so that the script does not fetch them again. The built
/// kernel's tree is shared (`.cache/kernel-build`): built from the same source and
/// configuration, make finds nothing to do there.
fn scratch_guest_dir(kind: Kind) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let debs = kind.assets().dir().join("debs");
    std::fs::create_dir(dir.path().join("debs"))?;
    for entry in std::fs::read_dir(&debs).with_context(|| format!("reading {}", debs.display()))? {
        let entry = entry?;
        std::fs::copy(
            entry.path(),
            dir.path().join("debs").join(entry.file_name()),
        )?;
    }
    Ok(dir)
}

/// Runs the script on `guest_dir`; returns what it logged.
fn guest_assets(kind: Kind, guest_dir: &Path) -> Result<String> {
    let out = Command::new(repo().join("scripts/guest-assets.sh"))
        .env("GUEST_DIR", guest_dir)
        .env("GUEST_KERNEL", kind.name())
        .env_remove("KERNEL_PACKAGE")
        .env_remove("KERNEL_SOURCE_PACKAGE")
        .output()
        .context("running scripts/guest-assets.sh")?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "guest-assets.sh failed:\n{log}");
    Ok(log)
}

/// `KEY=value` lines of the manifest.
fn manifest(guest_dir: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(guest_dir.join("VERSION"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn field(manifest: &[(String, String)], key: &str) -> Result<String> {
    manifest
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("VERSION has no {key}"))
}

fn sha256(path: &Path) -> Result<String> {
    let out = run("sha256sum", &[&path.display().to_string()])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Unpacks an initramfs (a newc archive, gzip-compressed or not) into `dir`.
fn unpack_initramfs(image: &Path, dir: &Path) -> Result<()> {
    let mut magic = [0u8; 2];
    std::io::Read::read_exact(&mut std::fs::File::open(image)?, &mut magic)?;
    let reader = if magic == [0x1f, 0x8b] {
        "gzip -dc"
    } else {
        "cat"
    };
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{reader} '{}' | cpio -id --quiet", image.display()))
        .current_dir(dir)
        .status()?;
    ensure!(status.success(), "unpacking {}", image.display());
    Ok(())
}

/// Packs `dir` into an uncompressed newc initramfs at `image`, as `make guest-assets` does.
fn pack_initramfs(dir: &Path, image: &Path) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 > '{}'",
            image.display()
        ))
        .current_dir(dir)
        .status()?;
    ensure!(status.success(), "packing {}", image.display());
    Ok(())
}

/// Lists the `.ko` files of the initramfs unpacked in `root`, and its module load order.
fn initramfs_modules(root: &Path) -> Result<(Vec<PathBuf>, String)> {
    let modules = root.join("lib/modules");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&modules)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "ko") {
            found.push(path);
        }
    }
    let order = std::fs::read_to_string(modules.join("load-order"))?;
    Ok((found, order))
}

/// The outputs agree with each other and with the manifest: vmlinuz (and vmlinux) is the
/// manifest's kernel version, built for the job with what a guest needs built in and no
/// modules, or the unpacked package's own bzImage with every module in the initramfs built
/// for it; and the recorded digests are the files'.
fn assert_consistent(kind: Kind, guest_dir: &Path) -> Result<()> {
    let m = manifest(guest_dir)?;
    ensure!(
        field(&m, "GUEST_KERNEL")? == kind.name(),
        "{} holds a {} guest, not {}",
        guest_dir.display(),
        field(&m, "GUEST_KERNEL")?,
        kind.name()
    );
    let kver = field(&m, "KERNEL_VERSION")?;
    let vmlinuz = guest_dir.join("vmlinuz");
    let what = run("file", &["-b", &vmlinuz.display().to_string()])?;
    ensure!(
        what.contains(&format!("version {kver} ")),
        "vmlinuz is not kernel {kver}: {what}"
    );
    let config = std::fs::read_to_string(guest_dir.join("config"))?;
    let unpacked = tempfile::tempdir()?;
    unpack_initramfs(&guest_dir.join("initramfs.img"), unpacked.path())?;
    let (modules, order) = initramfs_modules(unpacked.path())?;
    let mut outputs = vec![
        ("VMLINUZ", "vmlinuz"),
        ("CONFIG", "config"),
        ("INITRAMFS", "initramfs.img"),
    ];
    match kind {
        Kind::Built => {
            let source = field(&m, "KERNEL_SOURCE_VERSION")?;
            ensure!(
                source.starts_with(&format!("{kver}-")),
                "kernel {kver} built from linux-source {source}"
            );
            for option in [
                "CONFIG_VIRTIO_PCI",
                "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
                "CONFIG_VIRTIO_NET",
                "CONFIG_VIRTIO_VSOCKETS",
                "CONFIG_VIRTIO_CONSOLE",
                "CONFIG_VIRTIO_FS",
                "CONFIG_OVERLAY_FS",
                "CONFIG_VIRTIO_BALLOON",
                "CONFIG_VMGENID",
                "CONFIG_HOTPLUG_PCI_PCIE",
            ] {
                ensure!(
                    config.lines().any(|l| l == format!("{option}=y")),
                    "{option} is not built in"
                );
            }
            ensure!(
                config.lines().any(|l| l == "# CONFIG_MODULES is not set"),
                "the kernel built for the job loads modules"
            );
            ensure!(
                modules.is_empty() && order.trim().is_empty(),
                "the initramfs of a kernel without modules has modules: {modules:?}, load order {order:?}"
            );
            let vmlinux = std::fs::read(guest_dir.join("vmlinux"))?;
            let banner = format!("Linux version {kver} ");
            ensure!(
                vmlinux
                    .windows(banner.len())
                    .any(|w| w == banner.as_bytes()),
                "vmlinux is not kernel {kver}"
            );
            outputs.push(("VMLINUX", "vmlinux"));
        }
        Kind::Debian => {
            let packaged = guest_dir.join("kernel-root/boot");
            ensure!(
                std::fs::read(&vmlinuz)?
                    == std::fs::read(packaged.join(format!("vmlinuz-{kver}")))?,
                "vmlinuz is not the bzImage of the unpacked kernel package {}",
                field(&m, "KERNEL_PACKAGE")?
            );
            ensure!(
                config == std::fs::read_to_string(packaged.join(format!("config-{kver}")))?,
                "config is not the packaged kernel's"
            );
            for path in &modules {
                let magic = run("modinfo", &["-F", "vermagic", &path.display().to_string()])?;
                ensure!(
                    magic.starts_with(&format!("{kver} ")),
                    "{} is built for {magic}, not {kver}",
                    path.display()
                );
            }
            ensure!(
                modules.len() >= 10 && order.lines().count() == modules.len(),
                "{} modules in the initramfs, {} in its load order",
                modules.len(),
                order.lines().count()
            );
            ensure!(
                !guest_dir.join("vmlinux").exists(),
                "a vmlinux beside Debian's kernel"
            );
        }
    }
    for (key, file) in outputs {
        ensure!(
            field(&m, &format!("{key}_OUTPUT_SHA256"))? == sha256(&guest_dir.join(file))?,
            "VERSION's digest of {file} is not the file's"
        );
    }
    Ok(())
}

/// What an `apt-get update` used to leave behind (a manifest naming another kernel source or
/// package, and an older kernel whose mtime says it is newer than everything) is rebuilt,
/// kernel and initramfs together; nothing is rebuilt when nothing changed; an output that no
/// longer matches its digest is rebuilt.
fn a_changed_kernel_rebuilds_kernel_and_initramfs_together(kind: Kind) {
    let dir = scratch_guest_dir(kind).unwrap();
    let g = dir.path();
    guest_assets(kind, g).unwrap();
    assert_consistent(kind, g).unwrap();

    let (version_key, digest_key) = match kind {
        Kind::Built => ("KERNEL_SOURCE_VERSION", "KERNEL_SOURCE_DEB_SHA256"),
        Kind::Debian => ("KERNEL_PACKAGE_VERSION", "KERNEL_DEB_SHA256"),
    };
    let text = std::fs::read_to_string(g.join("VERSION")).unwrap();
    let edited: String = text
        .lines()
        .map(|l| match l.split_once('=') {
            Some((k, _)) if k == version_key => format!("{k}=6.1.0-old"),
            Some((k, _)) if k == digest_key => format!("{k}={}", "0".repeat(64)),
            _ => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(g.join("VERSION"), edited).unwrap();
    std::fs::write(g.join("vmlinuz"), b"an older kernel").unwrap();
    let future = SystemTime::now() + Duration::from_secs(86_400);
    std::fs::File::options()
        .write(true)
        .open(g.join("vmlinuz"))
        .unwrap()
        .set_modified(future)
        .unwrap();

    let log = guest_assets(kind, g).unwrap();
    assert!(
        log.contains(&format!("rebuilding: {version_key} {digest_key}")),
        "the script did not say what changed:\n{log}"
    );
    assert_consistent(kind, g).unwrap();

    // Nothing changed: nothing is rebuilt.
    let before = std::fs::metadata(g.join("initramfs.img"))
        .unwrap()
        .modified()
        .unwrap();
    let log = guest_assets(kind, g).unwrap();
    assert!(log.contains("is up to date"), "{log}");
    let after = std::fs::metadata(g.join("initramfs.img"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an up-to-date initramfs was rebuilt");

    // An output that no longer matches its digest is rebuilt even if the inputs did not
    // change.
    std::fs::write(g.join("initramfs.img"), b"truncated").unwrap();
    let log = guest_assets(kind, g).unwrap();
    assert!(
        log.contains("an output no longer matches its recorded digest"),
        "{log}"
    );
    assert_consistent(kind, g).unwrap();
}

#[test]
fn a_changed_kernel_source_rebuilds_the_built_kernel_and_initramfs_together() {
    require_root(); // apt-get download, as `make guest-assets` runs it
    a_changed_kernel_rebuilds_kernel_and_initramfs_together(Kind::Built);
}

#[test]
fn a_changed_kernel_package_rebuilds_debians_kernel_and_initramfs_together() {
    require_root(); // apt-get download, as `make guest-assets-debian` runs it
    a_changed_kernel_rebuilds_kernel_and_initramfs_together(Kind::Debian);
}

#[test]
fn an_unknown_kernel_kind_is_refused_naming_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/guest-assets.sh"))
        .env("GUEST_DIR", dir.path())
        .env("GUEST_KERNEL", "stock")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "GUEST_KERNEL=stock was accepted:\n{log}"
    );
    assert!(
        log.contains("GUEST_KERNEL=stock") && log.contains("built") && log.contains("debian"),
        "{log}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a refused run left {left:?}");
}

/// Flips the CRC the module at `path` records for `module_layout` (its `__versions` entry),
/// as a module built against another kernel of the same version string would carry.
fn break_module_layout_crc(path: &Path) -> Result<()> {
    let mut elf = std::fs::read(path)?;
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF",
        path.display()
    );
    let shoff = u64_at(&elf, 0x28) as usize;
    let shentsize = u16_at(&elf, 0x3a);
    let shnum = u16_at(&elf, 0x3c);
    let shstrndx = u16_at(&elf, 0x3e);
    let section = |i: usize| {
        let h = shoff + i * shentsize;
        (
            u32_at(&elf, h) as usize,
            u64_at(&elf, h + 0x18) as usize,
            u64_at(&elf, h + 0x20) as usize,
        )
    };
    let (_, strtab, _) = section(shstrndx);
    let (offset, size) = (0..shnum)
        .map(section)
        .find(|(name, _, _)| elf[strtab + name..].starts_with(b"__versions\0"))
        .map(|(_, off, size)| (off, size))
        .context("no __versions section")?;
    // struct modversion_info { unsigned long crc; char name[56]; }
    let entry = (offset..offset + size)
        .step_by(64)
        .find(|e| elf[e + 8..].starts_with(b"module_layout\0"))
        .context("no module_layout in __versions")?;
    for b in &mut elf[entry..entry + 4] {
        *b ^= 0xff;
    }
    // The edit voids the module's signature, which the kernel refuses whether or not it
    // enforces signatures; without one, as a module signed by another build's key, it
    // goes on to the version check.
    strip_signature(&mut elf)?;
    std::fs::write(path, elf)?;
    Ok(())
}

/// Removes the signature appended to a kernel module (`struct module_signature` and the
/// `~Module signature appended~` marker at the end).
fn strip_signature(module: &mut Vec<u8>) -> Result<()> {
    const MARKER: &[u8] = b"~Module signature appended~\n";
    const INFO: usize = 12;
    if !module.ends_with(MARKER) {
        return Ok(());
    }
    let info = module.len() - MARKER.len() - INFO;
    let signer = module[info + 3] as usize;
    let key_id = module[info + 4] as usize;
    let sig = u32::from_be_bytes(module[info + 8..info + 12].try_into().unwrap()) as usize;
    let end = info
        .checked_sub(sig + signer + key_id)
        .context("a module signature longer than the module")?;
    module.truncate(end);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_does_not_match_the_kernel_fails_the_boot_naming_it() {
    require_root();
    Qemu::Q35.can_boot().unwrap();
    let assets = GuestAssets::debian();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    unpack_initramfs(&assets.initrd, &root).unwrap();
    break_module_layout_crc(&root.join("lib/modules/virtio_ring.ko")).unwrap();
    let initrd = work.path().join("initramfs.img");
    pack_initramfs(&root, &initrd).unwrap();

    let config = hypervisor::HypervisorConfig {
        initrd: Some(initrd),
        ..Qemu::Q35.config(&assets)
    };
    let mut sb = Sandbox::prepare(&Qemu::Q35, config).await.unwrap();
    let began = Instant::now();
    let err = match sb.start().await {
        Ok(()) => panic!("a guest whose virtio_ring does not match its kernel started"),
        Err(e) => format!("{e:#}"),
    };
    let took = began.elapsed();
    assert!(
        err.contains("module virtio_ring did not load")
            && err.contains("disagrees about version of symbol module_layout"),
        "the error does not name the module and the mismatch: {err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the failure took {took:?} to be reported (limit 10 s): {err}"
    );
    eprintln!("reported after {took:?}: {err}");
    let pid = sb.hv.pids().await.ok().map(|p| p.vmm);
    sb.teardown(pid).await.unwrap();
}

/// The guest the other VM tests boot is itself consistent, and is the kernel built for the
/// job.
#[test]
fn the_default_guest_is_the_kernel_built_for_the_job() {
    let assets = GuestAssets::find();
    assert_consistent(Kind::Built, assets.dir())
        .unwrap_or_else(|e| panic!("{e:#} (run `make guest-assets` to rebuild)"));
}

/// The guest on Debian's kernel has one kernel for vmlinuz and modules.
#[test]
fn the_debian_guest_has_one_kernel_for_vmlinuz_and_modules() {
    let assets = GuestAssets::debian();
    assert_consistent(Kind::Debian, assets.dir())
        .unwrap_or_else(|e| panic!("{e:#} (run `make guest-assets-debian` to rebuild)"));
}

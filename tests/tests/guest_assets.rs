//! The guest assets `scripts/guest-assets.sh` builds: rebuilt from their content, never a
//! kernel from one package beside modules from another; and a guest whose modules do not
//! match its kernel fails its boot at once, naming the module.

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

/// A guest directory of its own, seeded with the packages `make guest-assets` downloaded so
/// that the script does not fetch them again.
fn scratch_guest_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let debs = GuestAssets::find()
        .kernel
        .parent()
        .expect("the kernel is in the guest directory")
        .join("debs");
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
fn guest_assets(guest_dir: &Path) -> Result<String> {
    let out = Command::new(repo().join("scripts/guest-assets.sh"))
        .env("GUEST_DIR", guest_dir)
        .env_remove("KERNEL_PACKAGE")
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

/// The outputs agree with each other and with the manifest: vmlinuz is the unpacked
/// package's own bzImage, of the manifest's kernel version, every module in the initramfs
/// is built for that version, and the recorded digests are the files'.
fn assert_consistent(guest_dir: &Path) -> Result<()> {
    let m = manifest(guest_dir)?;
    let kver = field(&m, "KERNEL_VERSION")?;
    let vmlinuz = guest_dir.join("vmlinuz");
    let packaged = guest_dir.join(format!("kernel-root/boot/vmlinuz-{kver}"));
    ensure!(
        std::fs::read(&vmlinuz)? == std::fs::read(&packaged)?,
        "vmlinuz is not the bzImage of the unpacked kernel package {}",
        field(&m, "KERNEL_PACKAGE")?
    );
    let what = run("file", &["-b", &vmlinuz.display().to_string()])?;
    ensure!(
        what.contains(&format!("version {kver} ")),
        "vmlinuz is not kernel {kver}: {what}"
    );
    let unpacked = tempfile::tempdir()?;
    unpack_initramfs(&guest_dir.join("initramfs.img"), unpacked.path())?;
    let modules = unpacked.path().join("lib/modules");
    let mut count = 0;
    for entry in std::fs::read_dir(&modules)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "ko") {
            let magic = run("modinfo", &["-F", "vermagic", &path.display().to_string()])?;
            ensure!(
                magic.starts_with(&format!("{kver} ")),
                "{} is built for {magic}, not {kver}",
                path.display()
            );
            count += 1;
        }
    }
    ensure!(count >= 10, "only {count} modules in the initramfs");
    ensure!(
        field(&m, "VMLINUZ_OUTPUT_SHA256")? == sha256(&vmlinuz)?
            && field(&m, "INITRAMFS_OUTPUT_SHA256")? == sha256(&guest_dir.join("initramfs.img"))?,
        "VERSION's output digests are not the files'"
    );
    Ok(())
}

#[test]
fn a_changed_kernel_package_rebuilds_vmlinuz_and_initramfs_together() {
    require_root(); // apt-get download, as `make guest-assets` runs it
    let dir = scratch_guest_dir().unwrap();
    let g = dir.path();
    guest_assets(g).unwrap();
    assert_consistent(g).unwrap();

    // What an `apt-get update` used to leave behind: a manifest naming another kernel
    // package, and an older kernel whose mtime says it is newer than everything.
    let text = std::fs::read_to_string(g.join("VERSION")).unwrap();
    let edited: String = text
        .lines()
        .map(|l| match l.split_once('=') {
            Some(("KERNEL_PACKAGE_VERSION", _)) => "KERNEL_PACKAGE_VERSION=6.1.0-old".to_string(),
            Some(("KERNEL_DEB_SHA256", _)) => format!("KERNEL_DEB_SHA256={}", "0".repeat(64)),
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

    let log = guest_assets(g).unwrap();
    assert!(
        log.contains("rebuilding: KERNEL_PACKAGE_VERSION KERNEL_DEB_SHA256"),
        "the script did not say what changed:\n{log}"
    );
    assert_consistent(g).unwrap();

    // Nothing changed: nothing is rebuilt.
    let before = std::fs::metadata(g.join("initramfs.img"))
        .unwrap()
        .modified()
        .unwrap();
    let log = guest_assets(g).unwrap();
    assert!(log.contains("are up to date"), "{log}");
    let after = std::fs::metadata(g.join("initramfs.img"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an up-to-date initramfs was rebuilt");

    // An output that no longer matches its digest is rebuilt even if the inputs did not
    // change.
    std::fs::write(g.join("initramfs.img"), b"truncated").unwrap();
    let log = guest_assets(g).unwrap();
    assert!(
        log.contains("an output no longer matches its recorded digest"),
        "{log}"
    );
    assert_consistent(g).unwrap();
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
    let assets = GuestAssets::find();
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

/// The guest the other VM tests boot is itself consistent.
#[test]
fn the_built_guest_has_one_kernel_for_vmlinuz_and_modules() {
    let assets = GuestAssets::find();
    let dir = assets.kernel.parent().expect("in the guest directory");
    assert_consistent(dir).unwrap_or_else(|e| panic!("{e:#} (run `make guest-assets` to rebuild)"));
}

//! The host mounts of a sandbox's shared directory: the directory made a mount point of its
//! own with shared propagation, the container root filesystems bind-mounted under it, and
//! their removal (by the teardown and by `sandbox cleanup`, from `/proc/self/mountinfo`).
//!
//! # Why shared propagation
//!
//! virtiofsd (the Rust daemon, `--sandbox=namespace`) serves the directory from a mount
//! namespace of its own, made when it starts: it unshares one, turns every mount in it into a
//! slave (`MS_SLAVE|MS_REC`), bind-mounts the shared directory onto itself and pivots into it.
//! A mount made later on the host reaches that namespace only if it is made under a mount of a
//! shared peer group the daemon's copy is a slave of. On a host whose `/` is private (as here)
//! or whose run root is on a private mount, nothing would. So the shared directory is
//! bind-mounted onto itself and made `MS_SHARED` before the daemon starts: the daemon's root
//! is then `master:N` of that peer group, each later bind mount under it shows up in the
//! daemon's namespace at once, and so does its unmount.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Bind-mounts `dir` onto itself and gives it shared propagation: a new peer group whose
/// later mounts propagate to the slaves made from it.
pub fn make_shared_mount_point(dir: &Path) -> Result<()> {
    bind(dir, dir)?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .with_context(|| format!("Making {} a shared mount", dir.display()))
}

/// Bind-mounts `source` on `target` (both existing directories), not recursively.
pub fn bind(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("Bind-mounting {} on {}", source.display(), target.display()))
}

/// The mount points at or under `dir` in this process's mount namespace, deepest last.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmounts every mount at or under `dir`, deepest first, each detached (`MNT_DETACH`: a
/// process with its cwd there does not hold it up, and nothing under it is reachable through
/// the directory afterwards). Returns what was unmounted, or the first failure.
pub fn unmount_all_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    // A directory mounted twice (a bind onto itself over a leftover one) is listed twice.
    loop {
        let mut found = mounts_under(dir);
        if found.is_empty() {
            return Ok(done);
        }
        found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in found {
            match umount2(&p, MntFlags::MNT_DETACH) {
                Ok(()) => done.push(p),
                // Gone with its parent meanwhile.
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("Unmounting {}", p.display()))
                }
            }
        }
        if done.len() > 1024 {
            anyhow::bail!("Unmounting under {}: mounts keep appearing", dir.display());
        }
    }
}

/// The mount points (fifth field) of `/proc/self/mountinfo` text, in its order.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(digits, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_and_unescaped() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    43 27 254:0 /a /run/x\\040y rw shared:2 - ext4 /dev/vda rw\n";
        assert_eq!(
            mount_points(text),
            [PathBuf::from("/"), PathBuf::from("/run/x y")]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    }

    /// A bind under a shared mount point is listed, and everything goes in one call.
    #[test]
    fn a_shared_mount_point_and_its_binds_are_unmounted_together() {
        let root = tempfile::tempdir().unwrap();
        let share = root.path().join("shared");
        let src = root.path().join("src");
        std::fs::create_dir_all(share.join("c/rootfs")).unwrap();
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        make_shared_mount_point(&share).expect("mounting (needs root)");
        bind(&src, &share.join("c/rootfs")).unwrap();
        assert_eq!(
            mounts_under(&share),
            [share.clone(), share.join("c/rootfs")]
        );
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(share.to_str().unwrap()))
            .unwrap();
        assert!(line.contains(" shared:"), "not shared: {line}");
        assert!(std::fs::read_to_string(share.join("c/rootfs/f")).is_ok());

        let done = unmount_all_under(&share).unwrap();
        assert_eq!(done, [share.join("c/rootfs"), share.clone()]);
        assert_eq!(mounts_under(root.path()), Vec::<PathBuf>::new());
        assert!(!share.join("c/rootfs/f").exists());
        assert!(src.join("f").exists());
    }
}

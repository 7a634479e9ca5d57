//! Containers in a QEMU guest: a busybox root filesystem under a share directory, a sandbox
//! whose read-write share (`kataShared`) the agent mounts at [`SHARED_TARGET`], OCI specs,
//! and what the guest and the host hold (mounts, container processes, virtiofsd daemons).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use guest_agent::client::{AgentClient, OutputStream};
use guest_agent::protocol::{ExecRequest, MountShare};
use hypervisor::{DeviceConfig, SharedFsConfig, SharedFsKind};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::qemu::{Kept, Qemu};
use crate::{Backend, GuestAssets, Sandbox};

/// The sandbox share's tag (Kata's `kataShared`).
pub const SHARE_TAG: &str = "kataShared";
/// Where the agent mounts the sandbox share in the guest.
pub const SHARED_TARGET: &str = "/run/kata-containers/shared";
/// Timeout of one agent request that does not wait for a process.
pub const CALL: Duration = Duration::from_secs(30);

/// Busybox applets linked in a test root filesystem.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "ps",
    "sleep",
    "stty",
    "hostname",
    "id",
    "ls",
    "touch",
    "head",
    "wc",
    "sha256sum",
    "true",
    "kill",
    "grep",
    "tty",
];

/// A static busybox: the one `make guest-assets` unpacked from Debian's `busybox-static`
/// (`.cache/guest/busybox-root`), or the host's `/bin/busybox` when that one is static.
pub fn static_busybox() -> Result<PathBuf> {
    let cached =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/guest/busybox-root/bin/busybox");
    for candidate in [cached.as_path(), Path::new("/bin/busybox")] {
        if let Ok(out) = std::process::Command::new("file").arg(candidate).output() {
            if String::from_utf8_lossy(&out.stdout).contains("statically linked") {
                return Ok(candidate.to_path_buf());
            }
        }
    }
    bail!("no static busybox: run `make guest-assets` (it unpacks Debian's busybox-static)")
}

/// Builds `<share>/<id>/rootfs`: a static busybox with its applets, and the directories a
/// container's mounts need. Returns the rootfs.
pub fn busybox_rootfs(share: &Path, id: &str) -> Result<PathBuf> {
    let root = share.join(id).join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "work"] {
        std::fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}/{sub}", root.display()))?;
    }
    std::fs::copy(static_busybox()?, root.join("bin/busybox")).context("copying busybox")?;
    for applet in APPLETS {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(root)
}

/// The guest path of container `id`'s rootfs in the sandbox share.
pub fn guest_rootfs(id: &str) -> String {
    format!("{SHARED_TARGET}/{id}/rootfs")
}

/// An OCI process running `args` as root in `/`.
pub fn process_json(args: &[&str]) -> Value {
    json!({
        "args": args,
        "env": ["PATH=/bin", "HOME=/"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
    })
}

/// An OCI runtime spec (what `runc spec` writes, trimmed) running `args`.
pub fn spec_json(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process_json(args),
        "root": {"path": "rootfs"},
        "hostname": "container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
        ],
    })
}

/// q35 with virtio-fs on.
pub fn backend() -> Kept {
    Kept::new(Qemu::Q35).adjust(|c| c.shared_fs = SharedFsKind::VirtioFs)
}

/// A share device of `dir` tagged `tag`.
pub fn share(tag: &str, dir: &Path, read_only: bool) -> DeviceConfig {
    DeviceConfig::SharedFs(SharedFsConfig {
        read_only,
        ..SharedFsConfig::new(tag, dir)
    })
}

/// Prepares a VM of `backend` with the read-write share `share_dir` (tag [`SHARE_TAG`]) and
/// `extra` devices cold-plugged, boots it, and has the agent mount the share at
/// [`SHARED_TARGET`].
pub async fn boot_with_share(
    backend: &dyn Backend,
    share_dir: &Path,
    extra: Vec<DeviceConfig>,
) -> Result<Sandbox> {
    let config = backend.config(&GuestAssets::find());
    let mut sb = Sandbox::prepare(backend, config).await?;
    sb.devices
        .add(share(SHARE_TAG, share_dir, false))
        .await
        .context("adding the sandbox share")?;
    for device in extra {
        sb.devices.add(device).await.context("adding a device")?;
    }
    sb.start().await?;
    sb.agent()
        .mount_share(
            MountShare {
                tag: SHARE_TAG.into(),
                target: SHARED_TARGET.into(),
                read_only: false,
            },
            CALL,
        )
        .await
        .context("mount_share")?;
    Ok(sb)
}

/// Runs `sh -c SCRIPT` in the guest (outside any container) through the agent's `exec`;
/// fails unless it exits 0. Its stdout.
pub async fn guest_sh(agent: &AgentClient, script: &str) -> Result<String> {
    let out = agent
        .exec(
            ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                timeout_ms: Some(20_000),
            },
            CALL,
        )
        .await?;
    ensure!(
        out.exit_code == Some(0) && !out.truncated,
        "{script:?} failed in the guest ({:?}): {}",
        out.exit_code,
        out.stderr
    );
    Ok(out.stdout)
}

/// The guest's mount table as the agent sees it (`/proc/mounts`).
pub async fn guest_mounts(agent: &AgentClient) -> Result<String> {
    guest_sh(agent, "cat /proc/mounts").await
}

/// Guest processes in another mount or PID namespace than the agent's (container
/// processes), as `PID COMMAND` lines. Kernel threads (kthreadd's children, such as
/// `kdevtmpfs` in a mount namespace of its own) are not counted.
pub async fn container_processes(agent: &AgentClient) -> Result<Vec<String>> {
    let out = guest_sh(
        agent,
        "me=$(readlink /proc/self/ns/mnt) mp=$(readlink /proc/self/ns/pid); \
         for p in /proc/[0-9]*; do \
           [ \"${p#/proc/}\" = 2 ] && continue; \
           grep -q '^PPid:[[:space:]]*2$' $p/status 2>/dev/null && continue; \
           m=$(readlink $p/ns/mnt) || continue; n=$(readlink $p/ns/pid) || continue; \
           if [ \"$m\" != \"$me\" ] || [ \"$n\" != \"$mp\" ]; then \
             echo \"${p#/proc/} $(cat $p/comm 2>/dev/null)\"; fi; \
         done",
    )
    .await?;
    Ok(out.lines().map(String::from).collect())
}

/// Checks the guest holds no container process and the mount table `baseline`.
pub async fn assert_guest_clean(agent: &AgentClient, baseline: &str) -> Result<()> {
    let procs = container_processes(agent).await?;
    ensure!(
        procs.is_empty(),
        "container processes left in the guest: {procs:?}"
    );
    let mounts = guest_mounts(agent).await?;
    ensure!(
        mounts == baseline,
        "the guest's mounts changed:\nbefore:\n{baseline}\nafter:\n{mounts}"
    );
    Ok(())
}

/// Reads a stream to its end.
pub async fn read_to_end(stream: Option<OutputStream>) -> Result<Vec<u8>> {
    let mut stream = stream.context("no output stream")?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(out)
}

/// Pids of the virtiofsd processes serving `dir` (their command line names it). The Rust
/// daemon with `--sandbox namespace` is two: the one the backend started, and the one it forks
/// into its namespaces.
pub fn daemons_serving(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("virtiofsd"))
            && args.iter().any(|a| a.ends_with(&format!("={dir}")))
        {
            pids.push(pid);
        }
    }
    pids
}

/// `sha256sum FILE`: the hex digest.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = crate::run("sha256sum", &[path.to_str().context("a UTF-8 path")?])?;
    Ok(out
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_string())
}

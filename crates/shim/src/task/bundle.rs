//! An OCI bundle as containerd hands it over: its `config.json`, what the CRI annotations say
//! about the pod, the root filesystem mounts, and the spec rewritten for the guest.
//!
//! In the guest, a container's root is its host root filesystem bound into the sandbox's share,
//! and the spec's own bind mounts of host files (CRI's `/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname`, `/dev/termination-log`) are bound into the share beside it, their sources
//! rewritten to the guest's view ([`guest_spec`]). A bind of the pod's `/dev/shm` becomes a
//! tmpfs of the container's own. Namespace paths name host namespaces: the guest runtime makes
//! its own (containers share the VM's network), so they are left as they are.
//!
//! The spec is handled as JSON, not as typed OCI structures: what the shim does not touch
//! reaches the guest exactly as containerd wrote it (the guest runtime reads it typed).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use containerd_shim_protos::api::Mount as RootfsMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::{json, Value};

use crate::sandbox::SharedMount;

/// CRI's annotation naming what a container is: `sandbox` (the pod's) or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a bundle's container is to the shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// It has a VM of its own: a pod's sandbox container, or a plain container (`ctr run`).
    Sandbox,
    /// It joins the VM of pod sandbox `sandbox_id`.
    Member {
        /// The pod sandbox's id (its shim's task id).
        sandbox_id: String,
    },
}

/// The bundle's `config.json`, read and parsed (an object).
pub fn read_spec(bundle: &Path) -> Result<Value> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("Reading the OCI spec {}", path.display()))?;
    let spec: Value = serde_json::from_str(&text)
        .with_context(|| format!("Parsing the OCI spec {}", path.display()))?;
    if !spec.is_object() {
        bail!("the OCI spec {} is not a JSON object", path.display());
    }
    Ok(spec)
}

/// What the container is, from its CRI annotations.
pub fn kind(spec: &Value) -> Kind {
    let annotation = |key: &str| spec["annotations"][key].as_str();
    match (annotation(CONTAINER_TYPE), annotation(SANDBOX_ID)) {
        (Some("container"), Some(sandbox_id)) if !sandbox_id.is_empty() => Kind::Member {
            sandbox_id: sandbox_id.to_string(),
        },
        _ => Kind::Sandbox,
    }
}

/// The id of the VM a bundle's container runs in: its own, or its pod's.
pub fn sandbox_id(spec: &Value, id: &str) -> String {
    match kind(spec) {
        Kind::Sandbox => id.to_string(),
        Kind::Member { sandbox_id } => sandbox_id,
    }
}

/// The network namespace the spec joins (the pod's, made by CRI), if it names one.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The root filesystem directory: `<bundle>/rootfs` with containerd's mounts mounted on it
/// (returned as mounted by us), or the spec's `root.path` when there are none.
pub fn mount_rootfs(
    bundle: &Path,
    spec: &Value,
    mounts: &[RootfsMount],
) -> Result<(PathBuf, bool)> {
    if mounts.is_empty() {
        let root = spec["root"]["path"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("the bundle has no root filesystem: no rootfs mounts and no root.path in its spec"))?;
        let root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        if !root.is_dir() {
            bail!(
                "the bundle has no root filesystem: {} is not a directory",
                root.display()
            );
        }
        return Ok((root, false));
    }
    let target = bundle.join("rootfs");
    match std::fs::create_dir(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("Creating {}", target.display())),
    }
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, &target) {
            if i > 0 {
                let _ = unmount_rootfs(bundle);
            }
            return Err(e);
        }
    }
    Ok((target, true))
}

fn mount_one(m: &RootfsMount, target: &Path) -> Result<()> {
    let (mut flags, data) = mount_options(&m.options);
    let typ = m.type_.as_str();
    if typ == "bind" || typ == "rbind" {
        flags |= MsFlags::MS_BIND;
    }
    let readonly_bind = flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY);
    let fstype = (!flags.contains(MsFlags::MS_BIND)).then_some(typ);
    let what = || {
        format!(
            "Mounting the root filesystem ({typ} {}) on {}",
            m.source,
            target.display()
        )
    };
    mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .with_context(what)?;
    if readonly_bind {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .with_context(what)?;
    }
    Ok(())
}

/// Splits mount options into flags and the data string the filesystem reads.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "private" | "rprivate" | "slave" | "rslave" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Unmounts `<bundle>/rootfs` (and anything under it) if it is a mount point; returns
/// whether something was unmounted.
pub fn unmount_rootfs(bundle: &Path) -> Result<bool> {
    let target = bundle.join("rootfs");
    let mounted = crate::mounts::mounts_under(&target);
    for m in mounted.iter().rev() {
        umount2(m, MntFlags::MNT_DETACH).with_context(|| format!("Unmounting {}", m.display()))?;
    }
    Ok(!mounted.is_empty())
}

/// The spec as the guest runs it, with the host files its bind mounts name: each is bound
/// into the share at `mounts/N` of the container's directory (`guest_dir` is that directory
/// as the guest sees it).
pub fn guest_spec(spec: &Value, guest_dir: &str) -> Result<(String, Vec<SharedMount>)> {
    let mut spec = spec.clone();
    let mut shared = Vec::new();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            let bind = m["type"] == "bind"
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
            let Some(source) = m["source"]
                .as_str()
                .map(PathBuf::from)
                .filter(|s| bind && s.is_absolute())
            else {
                continue;
            };
            let destination = m["destination"].as_str().unwrap_or_default().to_string();
            if destination == "/dev/shm" {
                *m = json!({
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
                });
                continue;
            }
            if !source.exists() {
                bail!(
                    "mount source {} (for {destination}) does not exist",
                    source.display()
                );
            }
            let rel = format!("mounts/{}", shared.len());
            m["source"] = Value::String(format!("{guest_dir}/{rel}"));
            shared.push(SharedMount { source, rel });
        }
    }
    Ok((serde_json::to_string(&spec)?, shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> Value {
        json
    }

    #[test]
    fn cri_annotations_group_a_pod() {
        let member = spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": {
            CONTAINER_TYPE: "container", SANDBOX_ID: "pod1"}}));
        assert_eq!(sandbox_id(&member, "c1"), "pod1");
        let pod = spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": {
            CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod1"}}));
        assert_eq!(kind(&pod), Kind::Sandbox);
        let plain = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(sandbox_id(&plain, "web"), "web");
    }

    #[test]
    fn the_network_namespace_path_is_read() {
        let s = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}}),
        );
        assert_eq!(netns_path(&s), Some(PathBuf::from("/var/run/netns/cni-1")));
        let s = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "network"}]}}),
        );
        assert_eq!(netns_path(&s), None);
    }

    #[test]
    fn host_binds_go_through_the_share_and_shm_becomes_a_tmpfs() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let s = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
        ]}));
        let (json, shared) = guest_spec(&s, "/run/kata-containers/shared/c1").unwrap();
        assert_eq!(
            shared,
            vec![SharedMount {
                source: hosts.clone(),
                rel: "mounts/0".into()
            }]
        );
        let out: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mounts = out["mounts"].as_array().unwrap();
        assert_eq!(
            mounts[1]["source"],
            "/run/kata-containers/shared/c1/mounts/0"
        );
        assert_eq!(mounts[2]["type"], "tmpfs");
        let missing = spec(serde_json::json!({"ociVersion": "1.0.2", "mounts": [
            {"destination": "/data", "type": "bind", "source": "/nonexistent/x", "options": ["rbind"]}]}));
        let err = guest_spec(&missing, "/g").unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/x") && err.contains("/data"),
            "{err}"
        );
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) =
            mount_options(&["ro", "index=off", "lowerdir=/a:/b", "nosuid"].map(String::from));
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(data, "index=off,lowerdir=/a:/b");
    }

    #[test]
    fn a_bundle_without_rootfs_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}));
        let err = mount_rootfs(dir.path(), &s, &[]).unwrap_err().to_string();
        assert!(
            err.contains("has no root filesystem") && err.contains("rootfs"),
            "{err}"
        );
    }
}

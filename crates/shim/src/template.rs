//! VM templates (Kata's factory): one template VM booted per distinct configuration, saved,
//! and restored by every sandbox of that configuration.
//!
//! A template lives in `template_path/DIGEST/` (Kata's `[factory] template_path`, on tmpfs by
//! default: `/run/vc/vm/template`): `memory` (the guest RAM, which clones map copy-on-write,
//! so a clone's private memory is only what it dirties), `state` (the device state, saved
//! without the RAM) and `meta.json` (what it was made from; written last, so a directory
//! without it is half-made and never restored). `DIGEST` is the SHA-256 of what makes a
//! template restorable: the shim's version and binary (the command line it gives the VMM
//! comes with it), the backend, the identity of the VMM binary, the
//! kernel and the initrd (path, device, inode, size and modification time: a file replaced or
//! rewritten is another file; reading them whole would cost more than the restore), vCPUs,
//! memory, machine type, kernel parameters, agent channel and NIC queues. A template made by another
//! QEMU, kernel or configuration has another digest, so
//! it is never restored: the sandbox gets a new template of its own configuration, and the
//! old one stays listed as stale until `sandbox template delete` removes it.
//!
//! Creating a template (`sandbox template create`, or the first sandbox that needs it) boots a
//! VM with one NIC and no shared directory, waits for its agent, saves it and stops it, all in
//! `DIGEST.new-PID/`, renamed into place once complete; a lock file serialises creators of
//! one digest. The NIC's host side is a TAP that carries nothing ([`net::spare_nic`]), in a
//! namespace of its own (`kata-template-PID`, deleted with it). A clone binds that NIC to its
//! first TAP (a restored VM has its template's devices; only their host side differs), so its
//! first NIC needs no hot-plug: the guest has probed it already, and the agent gives it the
//! clone's MAC (the template's is [`Meta::nic_mac`]) with its addresses. Further NICs are
//! hot-plugged once the clone runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use hypervisor::{Boot, DeviceConfig, DeviceManager, HypervisorConfig, MacAddress, SandboxSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slog::info;

use crate::backend::{self, BackendKind, BackendOptions};
use crate::config::ShimConfig;
use crate::net;
use crate::sandbox::vm_root;

/// The file of the template's guest RAM.
pub const MEMORY_FILE: &str = "memory";
/// The file of the template's device state.
pub const STATE_FILE: &str = "state";
/// The file that says what the template was made from; written last.
pub const META_FILE: &str = "meta.json";
/// Limit for the template VM to boot and its agent to answer.
const READY_LIMIT: Duration = Duration::from_secs(180);

/// What a template was made from, as its digest covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs(pub BTreeMap<String, String>);

impl Inputs {
    /// The inputs of configuration `cfg` (a few `stat`s).
    pub fn of(kind: BackendKind, cfg: &HypervisorConfig) -> Result<Inputs> {
        let mut m = BTreeMap::new();
        m.insert("shim".into(), env!("CARGO_PKG_VERSION").into());
        // The shim's own build: the command line it gives the VMM (built-in kernel
        // parameters, firmware, device layout) may change with it.
        let exe = std::env::current_exe().context("Finding the shim's own binary")?;
        m.insert("shim_binary".into(), file_identity(&exe)?);
        m.insert("backend".into(), kind.name().into());
        m.insert("vmm".into(), file_identity(&vmm_binary(cfg))?);
        m.insert("kernel".into(), file_identity(&cfg.kernel)?);
        if let Some(initrd) = &cfg.initrd {
            m.insert("initrd".into(), file_identity(initrd)?);
        }
        m.insert("vcpus".into(), cfg.vcpus.to_string());
        m.insert("memory_mib".into(), cfg.memory_mib.to_string());
        m.insert(
            "machine_type".into(),
            cfg.machine_type.clone().unwrap_or_default(),
        );
        m.insert("kernel_params".into(), cfg.kernel_params.join(" "));
        m.insert(
            "agent_channel".into(),
            format!("{:?} port {}", cfg.agent_channel, cfg.agent_port),
        );
        m.insert("accelerator".into(), format!("{:?}", cfg.accelerator));
        m.insert("nic_queues".into(), cfg.network_queues.to_string());
        Ok(Inputs(m))
    }

    /// The digest naming the template's directory (hex, 16 characters: collisions among a
    /// host's handful of templates are not a concern; the full inputs are compared too).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in &self.0 {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// What it was made from.
    pub inputs: Inputs,
    /// The VMM's `--version` line.
    #[serde(default)]
    pub vmm_version: String,
    /// When it was saved (seconds since the epoch).
    pub created_unix: u64,
    /// How long the template VM took to boot and answer, and to be saved (ms).
    pub boot_ms: u64,
    /// Saving time (ms).
    pub save_ms: u64,
    /// The MAC of the template's NIC, which a clone's guest has until its agent sets the
    /// clone's.
    pub nic_mac: MacAddress,
}

/// A complete template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
    /// Its digest (the directory's name).
    pub digest: String,
    /// What it says of itself.
    pub meta: Meta,
}

/// A directory of the template store, as `sandbox template list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// A complete template.
    Complete(Template),
    /// A directory without a readable `meta.json` (being made, or left by a creator that died).
    Incomplete(PathBuf),
}

/// The complete template of `inputs` in `store`, if there is one.
pub fn find(store: &Path, inputs: &Inputs) -> Option<Template> {
    let digest = inputs.digest();
    let t = read(&store.join(&digest))?;
    (t.meta.inputs == *inputs).then_some(t)
}

fn read(dir: &Path) -> Option<Template> {
    let text = std::fs::read_to_string(dir.join(META_FILE)).ok()?;
    let meta: Meta = serde_json::from_str(&text).ok()?;
    if !dir.join(MEMORY_FILE).is_file() || !dir.join(STATE_FILE).is_file() {
        return None;
    }
    Some(Template {
        dir: dir.to_path_buf(),
        digest: dir.file_name()?.to_string_lossy().into_owned(),
        meta,
    })
}

/// Every directory of the store, sorted by name.
pub fn list(store: &Path) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("Reading {}", store.display())),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        out.push(match read(&dir) {
            Some(t) => Listed::Complete(t),
            None => Listed::Incomplete(dir),
        });
    }
    Ok(out)
}

/// Removes template `digest` (or, with `None`, every directory of the store). Clones that
/// run keep their memory: they map it, and the mapping outlives the file.
pub fn delete(store: &Path, digest: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in list(store)? {
        let dir = match entry {
            Listed::Complete(t) => t.dir,
            Listed::Incomplete(d) => d,
        };
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if digest.is_some_and(|d| name.as_deref() != Some(d)) {
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("Removing {}", dir.display()))?;
        removed.push(dir);
    }
    if let Some(d) = digest {
        if removed.is_empty() {
            bail!("no template {d} in {}", store.display());
        }
    }
    Ok(removed)
}

/// The template of `cfg`: found, or made now (see the module docs). `run_root` holds the
/// template VM's run directory while it runs.
pub async fn ensure(log: &slog::Logger, cfg: &ShimConfig, run_root: &Path) -> Result<Template> {
    let store = cfg.factory.template_path.clone();
    let (kind, hc) = (cfg.backend, cfg.hypervisor.clone());
    let inputs = net::blocking(move || Inputs::of(kind, &hc)).await??;
    if let Some(t) = find(&store, &inputs) {
        return Ok(t);
    }
    std::fs::create_dir_all(&store)
        .with_context(|| format!("Creating the template store {}", store.display()))?;
    let digest = inputs.digest();
    // One creator per digest: the others wait here, then find it.
    let lock_path = store.join(format!("{digest}.lock"));
    let lock =
        File::create(&lock_path).with_context(|| format!("Creating {}", lock_path.display()))?;
    let lock = net::blocking(move || {
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::Error::from(e).context("Locking the template store"))
    })
    .await??;
    if let Some(t) = find(&store, &inputs) {
        return Ok(t);
    }
    let made = create(log, cfg, run_root, &store, &inputs).await;
    drop(lock);
    let _ = std::fs::remove_file(&lock_path);
    made
}

async fn create(
    log: &slog::Logger,
    cfg: &ShimConfig,
    run_root: &Path,
    store: &Path,
    inputs: &Inputs,
) -> Result<Template> {
    let digest = inputs.digest();
    let work = store.join(format!("{digest}.new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("Creating {}", work.display()))?;
    let nic_mac = MacAddress::local_from_seed(format!("template/{digest}").as_bytes());
    let made = boot_and_save(log, cfg, run_root, &work, &digest, nic_mac).await;
    let (boot_ms, save_ms) = match made {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e.context(format!("Creating the VM template {digest}")));
        }
    };
    let binary = vmm_binary(&cfg.hypervisor);
    let vmm_version = net::blocking(move || vmm_version(&binary)).await??;
    let meta = Meta {
        inputs: inputs.clone(),
        vmm_version,
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        boot_ms,
        save_ms,
        nic_mac,
    };
    crate::records::write_private(
        &work.join(META_FILE),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    let dir = store.join(&digest);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&work, &dir)
        .with_context(|| format!("Renaming {} into place", work.display()))?;
    info!(log, "VM template created"; "template" => &digest, "dir" => dir.display().to_string(),
        "boot_ms" => boot_ms, "save_ms" => save_ms);
    read(&dir).with_context(|| format!("Reading the template just made in {}", dir.display()))
}

/// Boots the template VM in `work` with one NIC of MAC `nic_mac`, waits for its agent,
/// saves it, stops it. Returns the boot and save times.
async fn boot_and_save(
    log: &slog::Logger,
    cfg: &ShimConfig,
    run_root: &Path,
    work: &Path,
    digest: &str,
    nic_mac: MacAddress,
) -> Result<(u64, u64)> {
    sweep_namespaces(log);
    let ns_name = format!("{NETNS_PREFIX}{}", std::process::id());
    let create = ns_name.clone();
    let netns = net::blocking(move || netdev::NetNs::create(&create))
        .await?
        .with_context(|| format!("Creating network namespace {ns_name} for the template VM"))?;
    let hv = backend::create(
        cfg.backend,
        log,
        &BackendOptions {
            run_root: vm_root(run_root),
        },
    )?;
    let mut config = cfg.hypervisor.clone();
    config.boot = Boot::TemplateSource {
        dir: work.to_path_buf(),
    };
    let spec = SandboxSpec {
        id: format!("template-{digest}-{}", std::process::id()),
        netns: Some(netns.path().to_path_buf()),
        config,
    };
    let t = Instant::now();
    let saved = async {
        hv.prepare(&spec)
            .await
            .context("Preparing the template VM")?;
        let nic = net::spare_nic(netns.path(), cfg.hypervisor.network_queues, nic_mac).await?;
        DeviceManager::new(hv.clone())
            .add(DeviceConfig::Network(nic))
            .await
            .context("Adding the template VM's NIC")?;
        hv.start(READY_LIMIT)
            .await
            .context("Starting the template VM")?;
        let address = hv.agent_address().await?;
        let mut agent = crate::sandbox::connect_agent(&address).await?;
        agent
            .wait_ready(READY_LIMIT)
            .await
            .context("Waiting for the template VM's agent")?;
        agent.close().await;
        let boot_ms = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        hv.save_template().await.context("Saving the template VM")?;
        Ok::<_, anyhow::Error>((boot_ms, t.elapsed().as_millis() as u64))
    }
    .await;
    let stopped = hv.stop().await;
    let cleaned = hv.cleanup().await;
    let deleted = net::blocking(move || netns.delete()).await?;
    let times = saved?;
    stopped.context("Stopping the template VM")?;
    cleaned.context("Removing the template VM's run directory")?;
    deleted.context("Deleting the template VM's network namespace")?;
    Ok(times)
}

/// Namespaces of template VMs are named this, then the creator's pid.
const NETNS_PREFIX: &str = "kata-template-";

/// Deletes the namespaces of template creators that died before they deleted theirs.
fn sweep_namespaces(log: &slog::Logger) {
    let Ok(entries) = std::fs::read_dir(netdev::NETNS_RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // Only "no such process" means dead: EPERM is a live process of another user.
        let dead = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if dead {
            match netdev::netns::delete_path(&entry.path()) {
                Ok(()) => {
                    info!(log, "deleted a dead template creator's namespace"; "netns" => &name)
                }
                Err(e) => slog::warn!(log, "cannot delete a dead template creator's namespace";
                    "netns" => &name, "error" => e.to_string()),
            }
        }
    }
}

/// The VMM binary a configuration runs.
fn vmm_binary(cfg: &HypervisorConfig) -> PathBuf {
    cfg.path
        .clone()
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"))
}

/// What tells one file from another: its path, device, inode, size and modification time.
fn file_identity(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).with_context(|| format!("Reading {}", path.display()))?;
    Ok(format!(
        "{} dev {} ino {} size {} mtime {}.{:09}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// The first line of `BINARY --version`.
fn vmm_version(binary: &Path) -> Result<String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("Running {} --version", binary.display()))?;
    if !out.status.success() {
        bail!("{} --version failed: {}", binary.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(kernel: &str) -> Inputs {
        Inputs(BTreeMap::from([
            ("kernel".to_string(), kernel.to_string()),
            ("vcpus".to_string(), "1".to_string()),
        ]))
    }

    fn make(store: &Path, inputs: &Inputs) -> PathBuf {
        let dir = store.join(inputs.digest());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), b"m").unwrap();
        std::fs::write(dir.join(STATE_FILE), b"s").unwrap();
        let meta = Meta {
            inputs: inputs.clone(),
            vmm_version: "QEMU emulator version 7.2".into(),
            created_unix: 1,
            boot_ms: 2,
            save_ms: 3,
            nic_mac: MacAddress([2, 0, 0, 0, 0, 1]),
        };
        std::fs::write(dir.join(META_FILE), serde_json::to_string(&meta).unwrap()).unwrap();
        dir
    }

    #[test]
    fn another_kernel_is_another_template() {
        let store = tempfile::tempdir().unwrap();
        let a = inputs("aaaa");
        let b = inputs("bbbb");
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 16);
        make(store.path(), &a);
        assert!(find(store.path(), &a).is_some());
        assert!(
            find(store.path(), &b).is_none(),
            "a stale template was offered"
        );
    }

    #[test]
    fn a_template_without_its_meta_or_files_is_incomplete_and_never_found() {
        let store = tempfile::tempdir().unwrap();
        let a = inputs("aaaa");
        let dir = make(store.path(), &a);
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        assert!(find(store.path(), &a).is_none());
        assert_eq!(
            list(store.path()).unwrap(),
            vec![Listed::Incomplete(dir.clone())]
        );
        // A meta whose inputs differ from the digest's (tampered) is not restored either.
        let dir = make(store.path(), &a);
        let other = Meta {
            inputs: inputs("cccc"),
            vmm_version: String::new(),
            created_unix: 1,
            boot_ms: 2,
            save_ms: 3,
            nic_mac: MacAddress([2, 0, 0, 0, 0, 1]),
        };
        std::fs::write(dir.join(META_FILE), serde_json::to_string(&other).unwrap()).unwrap();
        assert!(find(store.path(), &a).is_none());
    }

    #[test]
    fn delete_removes_one_or_all_and_names_a_missing_one() {
        let store = tempfile::tempdir().unwrap();
        let (a, b) = (inputs("aaaa"), inputs("bbbb"));
        make(store.path(), &a);
        make(store.path(), &b);
        let removed = delete(store.path(), Some(&a.digest())).unwrap();
        assert_eq!(removed, vec![store.path().join(a.digest())]);
        let err = delete(store.path(), Some(&a.digest()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no template"), "{err}");
        assert_eq!(delete(store.path(), None).unwrap().len(), 1);
        assert!(list(store.path()).unwrap().is_empty());
    }
}

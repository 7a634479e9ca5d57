//! The record of what a sandbox created, kept in its run directory (`record.json`) and
//! rewritten (write, then rename) as each thing is created: before the step when its name
//! is known in advance (the owned namespace, the backend's run directory, the pod endpoints,
//! the ready file, the shared directory and its bind mounts), right after it otherwise (a
//! TAP, the VMM). A shim that dies at any point
//! leaves a record covering what exists, from which [`crate::cleanup`] removes it.
//!
//! The run directory is claimed atomically with its first record in it (a private directory
//! renamed into place), so a run directory without a record is never a live sandbox's.

use std::fs::DirBuilder;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::procfs::ProcessStamp;

/// File name of the record inside the run directory.
pub const RECORD_FILE: &str = "record.json";

/// Everything a sandbox created that outlives its shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Sandbox id.
    pub id: String,
    /// The `sandbox run` process that owns the sandbox.
    pub owner: ProcessStamp,
    /// The namespace the NICs live in, and whether the sandbox created it (and deletes it).
    #[serde(default)]
    pub netns: Option<NetnsRecord>,
    /// TAPs the shim created for its own NICs.
    #[serde(default)]
    pub taps: Vec<TapRecord>,
    /// Pod interfaces connected to TAPs (ingress qdiscs and redirect filters added).
    #[serde(default)]
    pub endpoints: Vec<EndpointRecord>,
    /// The VMM process, once spawned.
    #[serde(default)]
    pub vmm: Option<ProcessStamp>,
    /// The backend's run directory (sockets, QEMU log).
    #[serde(default)]
    pub backend_dir: Option<PathBuf>,
    /// The ready file, once it is about to be written.
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
    /// The backend's saved state (`Hypervisor::save_state`), for a runtime that re-attaches.
    #[serde(default)]
    pub saved_state: Option<serde_json::Value>,
    /// The shared directory (virtio-fs), recorded before it is made a mount point: it and
    /// every mount under it are unmounted before the run directory is removed.
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
    /// Container root filesystems bind-mounted under the shared directory, recorded before
    /// each mount.
    #[serde(default)]
    pub binds: Vec<PathBuf>,
}

/// The sandbox's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRecord {
    /// Its path (`/run/netns/NAME` for a named one).
    pub path: PathBuf,
    /// Created by the sandbox, deleted with it.
    pub owned: bool,
}

/// A TAP of the shim's own NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRecord {
    /// Interface name.
    pub name: String,
    /// The namespace it is in.
    pub netns: PathBuf,
    /// Persistent (opened by name by the VMM): it stays until deleted. A TAP handed over as
    /// fds goes away with the last of them.
    pub persistent: bool,
}

/// A pod interface connected to a TAP: `endpoint::AttachPlan` in the namespace `netns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The pod namespace.
    pub netns: PathBuf,
    /// The CNI interface that got an ingress qdisc and a redirect filter.
    pub interface: String,
    /// Its ifindex.
    pub interface_index: u32,
    /// The TAP created for it (ingress qdisc and redirect filter of its own).
    pub tap: String,
    /// Persistent TAP.
    pub persistent: bool,
}

impl EndpointRecord {
    /// The record of `plan` in `netns`.
    pub fn new(netns: &Path, plan: &endpoint::AttachPlan) -> EndpointRecord {
        EndpointRecord {
            netns: netns.to_path_buf(),
            interface: plan.interface.clone(),
            interface_index: plan.interface_index,
            tap: plan.tap.clone(),
            persistent: plan.persistent,
        }
    }

    /// The plan to hand to `endpoint::detach_planned`.
    pub fn plan(&self) -> endpoint::AttachPlan {
        endpoint::AttachPlan {
            interface: self.interface.clone(),
            interface_index: self.interface_index,
            tap: self.tap.clone(),
            persistent: self.persistent,
        }
    }
}

impl Record {
    /// A record of nothing created yet, owned by this process.
    pub fn new(id: &str) -> Record {
        Record {
            id: id.to_string(),
            owner: ProcessStamp::current(),
            netns: None,
            taps: Vec::new(),
            endpoints: Vec::new(),
            vmm: None,
            backend_dir: None,
            ready_file: None,
            saved_state: None,
            shared_dir: None,
            binds: Vec::new(),
        }
    }
}

/// What is found at a sandbox's run directory.
#[derive(Debug)]
pub enum Existing {
    /// No run directory.
    None,
    /// A run directory whose owner still runs.
    Alive(Record),
    /// A run directory whose owner is gone (or exiting: killed, its fds closing).
    Dead(Record),
    /// A run directory without a readable record (left by an older shim, or damaged).
    Unrecorded(String),
}

/// Reads the run directory `state_dir`.
pub fn existing(state_dir: &Path) -> Existing {
    if !state_dir.exists() {
        return Existing::None;
    }
    let path = state_dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return Existing::Unrecorded(format!("reading {}: {e}", path.display())),
    };
    match serde_json::from_str::<Record>(&text) {
        Ok(r) if r.owner.is_running() => Existing::Alive(r),
        Ok(r) => Existing::Dead(r),
        Err(e) => Existing::Unrecorded(format!("parsing {}: {e}", path.display())),
    }
}

/// The live record of a sandbox: every change is written before the method returns.
#[derive(Debug)]
pub struct Records {
    dir: PathBuf,
    record: Record,
}

/// Why the run directory could not be claimed.
#[derive(Debug)]
pub enum ClaimError {
    /// Another run directory of that id is in place.
    Taken,
    /// Anything else.
    Failed(anyhow::Error),
}

impl Records {
    /// Creates the run directory `state_dir` holding `record`, atomically: either it appears
    /// with its record in it, or (when it exists already) [`ClaimError::Taken`].
    pub fn claim(state_dir: &Path, record: Record) -> std::result::Result<Records, ClaimError> {
        let parent = state_dir.parent().expect("a run directory has a parent");
        let fail = |e: anyhow::Error| ClaimError::Failed(e);
        create_private_parent(parent).map_err(fail)?;
        let name = state_dir
            .file_name()
            .expect("a run directory has a name")
            .to_string_lossy();
        let staging = parent.join(format!(".{name}.claim-{}", record.owner.pid));
        let _ = std::fs::remove_dir_all(&staging);
        DirBuilder::new()
            .mode(DIR_MODE)
            .create(&staging)
            .with_context(|| format!("Creating {}", staging.display()))
            .map_err(fail)?;
        let records = Records {
            dir: staging.clone(),
            record,
        };
        if let Err(e) = records.write() {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(fail(e));
        }
        // rename(2) replaces only an empty directory: a run directory with a record stays.
        if state_dir.exists() {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(ClaimError::Taken);
        }
        match std::fs::rename(&staging, state_dir) {
            Ok(()) => Ok(Records {
                dir: state_dir.to_path_buf(),
                record: records.record,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                if matches!(
                    e.kind(),
                    ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty
                ) {
                    Err(ClaimError::Taken)
                } else {
                    Err(fail(anyhow::Error::from(e).context(format!(
                        "Renaming {} to {}",
                        staging.display(),
                        state_dir.display()
                    ))))
                }
            }
        }
    }

    /// The record as last written.
    pub fn get(&self) -> &Record {
        &self.record
    }

    /// Changes the record and writes it.
    pub fn update(&mut self, change: impl FnOnce(&mut Record)) -> Result<()> {
        change(&mut self.record);
        self.write()
    }

    fn write(&self) -> Result<()> {
        let path = self.dir.join(RECORD_FILE);
        let tmp = self.dir.join(format!("{RECORD_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.record)?;
        write_private(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("Recording what sandbox {} created", self.record.id))
    }
}

/// Mode of the directories the shim makes under its run root.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files and sockets in them.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (`RUN_ROOT/sandboxes`) 0700, or makes it 0700. The run root above it is
/// created 0700 when missing; an existing one is made 0700 only when it is the default
/// one, the shim's own (a `--run-root` given may be a shared directory).
fn create_private_parent(dir: &Path) -> Result<()> {
    if let Some(root) = dir.parent().filter(|r| !r.exists()) {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(root)
            .with_context(|| format!("Creating the run root {}", root.display()))?;
    }
    if let Some(root) = dir
        .parent()
        .filter(|r| *r == Path::new(crate::DEFAULT_RUN_ROOT))
    {
        set_mode(root, DIR_MODE)?;
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("Creating {}", dir.display()))?;
    set_mode(dir, DIR_MODE)
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("Making {} {mode:o}", path.display()))
}

/// Writes `path` readable by its owner only (0600 from its creation; an existing file is
/// made 0600 too).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("Writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .and_then(|()| file.write_all(bytes))
        .with_context(|| format!("Writing {}", path.display()))
}

/// Claim directories of `name` left by processes that died between creating and renaming
/// them (`.NAME.claim-PID` under `parent`).
pub fn stale_claims(parent: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.claim-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_directory_holds_its_record_and_cannot_be_claimed_twice() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sandboxes").join("a");
        let mut records = Records::claim(&dir, Record::new("a")).unwrap();
        records
            .update(|r| r.backend_dir = Some("/x".into()))
            .unwrap();
        match existing(&dir) {
            Existing::Alive(r) => assert_eq!(&r, records.get()),
            other => panic!("expected a live record, got {other:?}"),
        }
        assert!(matches!(
            Records::claim(&dir, Record::new("a")),
            Err(ClaimError::Taken)
        ));
        // Nothing but the run directory is left next to it.
        let names: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn run_directories_are_0700_and_the_record_0600() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let run_root = root.path().join("run");
        let dir = run_root.join("sandboxes").join("m");
        // A looser record left by an older shim is made private when rewritten.
        std::fs::create_dir_all(run_root.join("sandboxes")).unwrap();
        set_mode(&run_root.join("sandboxes"), 0o755).unwrap();
        let mut records = Records::claim(&dir, Record::new("m")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&run_root.join("sandboxes")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(RECORD_FILE)), 0o600);
        set_mode(&dir.join(RECORD_FILE), 0o644).unwrap();
        records.update(|r| r.backend_dir = None).unwrap();
        assert_eq!(mode(&dir.join(RECORD_FILE)), 0o600);
        let file = root.path().join("f");
        std::fs::write(&file, "old").unwrap();
        write_private(&file, b"new").unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
    }

    #[test]
    fn a_record_whose_owner_is_gone_is_dead() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("b");
        let mut record = Record::new("b");
        record.owner.start_time += 1;
        Records::claim(&dir, record).unwrap();
        assert!(matches!(existing(&dir), Existing::Dead(_)));
        assert!(matches!(
            existing(&root.path().join("none")),
            Existing::None
        ));
        std::fs::remove_file(dir.join(RECORD_FILE)).unwrap();
        assert!(matches!(existing(&dir), Existing::Unrecorded(_)));
    }
}

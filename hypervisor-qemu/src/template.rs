//! VM templates on QEMU ([`hypervisor::Boot`]).
//!
//! A template's source boots cold with its RAM in the template's `memory` file, mapped shared
//! (`memory-backend-file,share=on`), and a `vmgenid` device. Saving it stops its vCPUs and
//! migrates its device state, without the RAM (the `x-ignore-shared` capability: shared RAM is
//! already in the file), to the template's `state` file through an fd passed with `getfd`
//! (QEMU's `-sandbox spawn=deny` rules out `exec:`). A clone starts with the same machine and
//! the same cold devices, its RAM mapped private (copy-on-write) from the memory file, a new
//! random `vmgenid` GUID (so the guest reseeds its RNG when it runs on) and `-incoming defer`;
//! start then restores the state from the `state` file (`migrate-incoming` from an fd QEMU
//! inherited), waits for the migration to complete, and lets the guest run (`cont`).
//!
//! QEMU opens no template file by path: the runtime opens both and QEMU gets fds. The memory
//! file is named `/proc/self/fd/N` (QEMU 7.2 opens a memory backend's `mem-path` with a plain
//! `open`, which knows no fd sets); that happens before QEMU chroots. QEMU reopens it
//! read-write there (a private mapping never writes to it), so an unprivileged QEMU
//! (`rootless`) needs read and write access to it: a source's is created for that user, and
//! prepare checks a clone's.
//!
//! That read-write open is QEMU 7.2's: it maps a file private only from one (8.2's
//! `readonly=on,rom=off` lifts that). So a clone's QEMU could write the template's pages that
//! other clones have not copied yet: clones of one template must trust each other as much as
//! they trust the runtime that made it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::vm::Context;
use hypervisor::{Boot, ConfigError, Error, HypervisorConfig, Result, TemplateFiles};
use serde_json::{json, Value};
use slog::{info, warn};

use crate::exit::early_exit;
use crate::process::QemuProcess;
use crate::qmp::QmpClient;
use crate::{cmdline::TemplateArgs, Qemu, QemuSandbox};

/// The `getfd` name of the state file while a template is saved.
const STATE_FD_NAME: &str = "template-state";

/// Mode of the files a template source creates.
const FILE_MODE: u32 = 0o600;

/// What `start` hands QEMU for a VM with a template role.
#[derive(Debug)]
pub(crate) struct StartTemplate {
    /// The command line's part.
    pub args: TemplateArgs,
    /// A clone's state file: its fd number in QEMU, and its path for errors.
    pub incoming: Option<(i32, PathBuf)>,
    /// A clone's `-kernel` ([`stub_kernel`]), which replaces the configuration's kernel and
    /// initrd.
    pub kernel: Option<PathBuf>,
}

/// Checks, at prepare, what QEMU will need of a template role's files: a clone's memory file
/// has the configured size, and an unprivileged QEMU may open the memory file read-write.
pub(crate) fn check(config: &HypervisorConfig) -> Result<()> {
    let (Boot::TemplateSource { dir } | Boot::FromTemplate { dir }) = &config.boot else {
        return Ok(());
    };
    let files = TemplateFiles::in_dir(dir);
    if let Boot::FromTemplate { .. } = config.boot {
        let len = std::fs::metadata(&files.memory)
            .map_err(|e| {
                ConfigError::new(
                    "boot.dir",
                    format!("{} cannot be read ({e})", files.memory.display()),
                )
            })?
            .len();
        let want = u64::from(config.memory_mib) << 20;
        if len != want {
            return Err(ConfigError::new(
                "boot.dir",
                format!(
                    "the template's memory file {} holds {len} bytes, not the {} MiB of memory_mib: the template was made for another configuration",
                    files.memory.display(),
                    config.memory_mib
                ),
            )
            .into());
        }
    }
    // A source's memory file is created at start and given to QEMU's user; a clone's must be
    // open to it.
    let Boot::FromTemplate { .. } = config.boot else {
        return Ok(());
    };
    if let Some(who) = crate::confine::run_as(config)? {
        let meta = std::fs::metadata(&files.memory);
        let meta = meta.map_err(|e| {
            ConfigError::new(
                "boot.dir",
                format!("{} cannot be read ({e})", dir.display()),
            )
        })?;
        if !crate::confine::may_access(&meta, &who, 0o6) {
            return Err(ConfigError::new(
                "boot.dir",
                format!(
                    "QEMU's user {}:{} (rootless_user {:?}) cannot open the template's memory file in {} read-write; give that user access, or turn rootless off",
                    who.uid,
                    who.gid,
                    config.rootless_user,
                    dir.display()
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// Opens a template role's files for QEMU, their fds into `fds`: the source's memory file
/// (created 0600 and sized), or a clone's memory and state files. `None` for a cold boot.
pub(crate) fn open(
    config: &HypervisorConfig,
    fds: &mut netdev::ChildFds,
) -> Result<Option<StartTemplate>> {
    let by_fd = |fds: &mut netdev::ChildFds, f: File| {
        PathBuf::from(format!("/proc/self/fd/{}", fds.push(OwnedFd::from(f))))
    };
    match &config.boot {
        Boot::Cold => Ok(None),
        Boot::TemplateSource { dir } => {
            let files = TemplateFiles::in_dir(dir);
            let failed = |e| {
                Error::backend(
                    format!(
                        "Creating the template's memory file {}",
                        files.memory.display()
                    ),
                    e,
                )
            };
            let memory = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(FILE_MODE)
                .open(&files.memory)
                .map_err(failed)?;
            memory
                .set_len(u64::from(config.memory_mib) << 20)
                .map_err(failed)?;
            // An unprivileged QEMU reopens it (and its clones will): it is that user's.
            if let Some(user) = crate::confine::run_as(config)? {
                nix::unistd::fchown(
                    &memory,
                    Some(nix::unistd::Uid::from_raw(user.uid)),
                    Some(nix::unistd::Gid::from_raw(user.gid)),
                )
                .map_err(|e| failed(std::io::Error::from(e)))?;
            }
            Ok(Some(StartTemplate {
                args: TemplateArgs::Source {
                    mem_path: by_fd(fds, memory),
                },
                incoming: None,
                kernel: None,
            }))
        }
        Boot::FromTemplate { dir } => {
            let files = TemplateFiles::in_dir(dir);
            let open = |p: &Path| {
                File::open(p).map_err(|e| {
                    Error::backend(format!("Opening the template's file {}", p.display()), e)
                })
            };
            let memory = open(&files.memory)?;
            let state = open(&files.state)?;
            let kernel =
                stub_kernel().map_err(|e| Error::backend("Creating the clone's stub kernel", e))?;
            Ok(Some(StartTemplate {
                args: TemplateArgs::Clone {
                    mem_path: by_fd(fds, memory),
                    vmgenid: random_guid()?,
                },
                incoming: Some((fds.push(OwnedFd::from(state)), files.state)),
                kernel: Some(PathBuf::from(format!("/proc/self/fd/{}", fds.push(kernel)))),
            }))
        }
    }
}

/// A clone's `-kernel`: a Linux boot protocol 2.06 header and nothing else, in a memfd.
///
/// A clone never boots: its guest runs on from the template's state. Its QEMU needs a
/// `-kernel` all the same, since the option ROM that loads one (`linuxboot_dma.bin`) is part
/// of the machine whose state it restores. But QEMU keeps the kernel it loads in its own
/// heap for the VM's life (to serve it to the firmware again on a reset): the
/// configuration's bzImage would cost every clone its size in private memory (13.5 MiB for
/// the `make guest-assets` kernel), and its initrd a mapping. This header makes QEMU add
/// the same option ROM and keeps one sector. The guest does not reboot into it: QEMU runs
/// with `-no-reboot`, so a reboot ends the clone.
fn stub_kernel() -> std::io::Result<OwnedFd> {
    use std::io::Write;
    // One setup sector after the boot sector, then one sector of "kernel".
    let mut image = vec![0u8; 3 * 512];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    image[0x202..0x206].copy_from_slice(b"HdrS"); // header magic
    image[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes()); // protocol version
    image[0x211] = 0x01; // loadflags: LOADED_HIGH
    image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    image[0x238..0x23c].copy_from_slice(&4096u32.to_le_bytes()); // cmdline_size
    let fd = nix::sys::memfd::memfd_create(c"clone-kernel", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut file = File::from(fd);
    file.write_all(&image)?;
    Ok(OwnedFd::from(file))
}

/// A random (version 4) GUID for a clone's `vmgenid`.
fn random_guid() -> Result<String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::backend("Drawing a generation id for the clone", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// `migrate-set-capabilities`: `x-ignore-shared` (RAM in the template's file is not
/// migrated) and `events` (QEMU says when the migration ends).
async fn set_capabilities(qmp: &QmpClient, timeout: Duration) -> crate::qmp::Result<Value> {
    let caps = json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": true },
        { "capability": "events", "state": true },
    ]});
    qmp.execute("migrate-set-capabilities", Some(caps), timeout)
        .await
}

/// Why a migration ended other than completed: QEMU's `error-desc` from `query-migrate`.
#[derive(Debug, thiserror::Error)]
#[error("the migration ended as {status}: {desc}")]
pub struct MigrationFailed {
    /// QEMU's migration status (`failed`, `cancelled`).
    pub status: String,
    /// QEMU's own text, or that it gave none.
    pub desc: String,
}

/// Waits for the migration in progress to end, on `events` subscribed before it began.
async fn wait_migration(
    qmp: &QmpClient,
    events: &mut crate::qmp::QmpEvents,
    timeout: Duration,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let ended = |d: &Value| {
        matches!(
            d["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    };
    let ev = qmp.wait_event(events, "MIGRATION", ended, timeout).await?;
    let status = ev.data["status"].as_str().unwrap_or_default().to_string();
    if status == "completed" {
        return Ok(());
    }
    let desc = match qmp.execute("query-migrate", None, timeout).await {
        Ok(v) => v["error-desc"]
            .as_str()
            .unwrap_or("QEMU gave no reason")
            .to_string(),
        Err(e) => format!("QEMU's reason could not be read: {e}"),
    };
    Err(Box::new(MigrationFailed { status, desc }))
}

/// Waits (at most `timeout`) until QEMU's run state is no longer `finish-migrate`.
async fn settled(qmp: &QmpClient, timeout: Duration) -> crate::qmp::Result<()> {
    let began = std::time::Instant::now();
    loop {
        let status = qmp.execute("query-status", None, timeout).await?;
        if status["status"] != "finish-migrate" || began.elapsed() > timeout {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Qemu {
    /// The backend's `save_template` step: stop the vCPUs, migrate the device state to the
    /// template's `state` file, leave the VM paused. On failure the VM runs on and no state
    /// file is left.
    pub(crate) async fn save(
        &self,
        vm: &mut QemuSandbox,
        ctx: Context<'_>,
    ) -> Result<TemplateFiles> {
        let Boot::TemplateSource { dir } = &ctx.spec.config.boot else {
            unreachable!("checked by the lifecycle core");
        };
        if let Some(hot) = vm.hot.values().find(|d| d.hotplugged) {
            // A clone starts with the cold devices only: the state of another would not load.
            return Err(Self::unsupported(
                "saving a template with hot-plugged devices",
                format!(
                    "device {} was hot-plugged into the source, and its clones could not have it; save before hot-plugging",
                    hot.id
                ),
            ));
        }
        let files = TemplateFiles::in_dir(dir);
        let qmp = vm.qmp.clone().expect("running VMs have QMP");
        let t = self.opts.qmp_timeout;
        let began = std::time::Instant::now();
        let state = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&files.state)
            .map_err(|e| {
                Error::backend(
                    format!(
                        "Creating the template's state file {}",
                        files.state.display()
                    ),
                    e,
                )
            })?;
        let mut events = qmp.subscribe();
        let saved: std::result::Result<(), (&str, Box<dyn std::error::Error + Send + Sync>)> =
            async {
                qmp.execute("stop", None, t)
                    .await
                    .map_err(|e| ("Stopping the vCPUs", self.boxed(e)))?;
                set_capabilities(&qmp, t)
                    .await
                    .map_err(|e| ("Setting the migration capabilities", self.boxed(e)))?;
                qmp.execute_with_fds(
                    "getfd",
                    Some(json!({ "fdname": STATE_FD_NAME })),
                    &[state.as_fd()],
                    t,
                )
                .await
                .map_err(|e| ("Passing the state file", self.boxed(e)))?;
                let uri = format!("fd:{STATE_FD_NAME}");
                qmp.execute("migrate", Some(json!({ "uri": uri })), t)
                    .await
                    .map_err(|e| ("Starting the migration", self.boxed(e)))?;
                wait_migration(&qmp, &mut events, t)
                    .await
                    .map_err(|e| ("Migrating the device state", e))?;
                // QEMU says "completed" a moment before its run state leaves
                // `finish-migrate` for `postmigrate` (no event marks that): the save returns
                // on a settled VM.
                settled(&qmp, t)
                    .await
                    .map_err(|e| ("Waiting for QEMU to finish the migration", self.boxed(e)))?;
                state
                    .sync_all()
                    .map_err(|e| ("Writing the state file to disk", Box::new(e) as _))
            }
            .await;
        if let Err((what, source)) = saved {
            drop(state);
            let _ = std::fs::remove_file(&files.state);
            if !qmp.is_closed() {
                if let Err(e) = qmp.execute("cont", None, t).await {
                    warn!(self.log, "could not resume the template source"; "error" => e.to_string());
                }
            }
            let source = match source.downcast::<crate::qmp::QmpError>() {
                Ok(e) => self.qmp_cause(ctx.lifecycle, *e).await,
                Err(other) => other,
            };
            return Err(Error::Backend {
                step: format!("Saving the template {}: {what}", files.state.display()),
                source,
            });
        }
        let size = std::fs::metadata(&files.state)
            .map(|m| m.len())
            .unwrap_or(0);
        info!(self.log, "template saved"; "sandbox" => &ctx.spec.id,
            "state" => files.state.display().to_string(), "bytes" => size,
            "ms" => began.elapsed().as_millis() as u64);
        Ok(files)
    }

    fn boxed(&self, e: crate::qmp::QmpError) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(e)
    }

    /// A clone's restore at start, after QMP answers: the device state from the inherited
    /// fd `fd` (the template's `state` file at `path`), then `cont`. A QEMU that exits on a
    /// bad state file is reported with its own words.
    pub(crate) async fn restore_template(
        &self,
        qmp: &QmpClient,
        child: &QemuProcess,
        (fd, path): (i32, PathBuf),
        timeout: Duration,
    ) -> Result<()> {
        let t = self.opts.qmp_timeout;
        let mut events = qmp.subscribe();
        let restored: std::result::Result<(), (&str, Box<dyn std::error::Error + Send + Sync>)> =
            async {
                set_capabilities(qmp, t)
                    .await
                    .map_err(|e| ("Setting the migration capabilities", self.boxed(e)))?;
                qmp.execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("fd:{fd}") })),
                    t,
                )
                .await
                .map_err(|e| ("Starting the incoming migration", self.boxed(e)))?;
                wait_migration(qmp, &mut events, timeout)
                    .await
                    .map_err(|e| ("Loading the device state", e))?;
                qmp.execute("cont", None, t)
                    .await
                    .map_err(|e| ("Resuming the clone", self.boxed(e)))?;
                Ok(())
            }
            .await;
        let Err((what, source)) = restored else {
            return Ok(());
        };
        // QEMU exits when an incoming migration fails: its own words say why.
        let mut exited = child.exited.clone();
        let source = if crate::exit::wait_exited(&mut exited, Duration::from_secs(2)).await {
            Box::new(early_exit(child)) as _
        } else {
            source
        };
        Err(Error::Backend {
            step: format!(
                "Starting from the template state {}: {what}",
                path.display()
            ),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hypervisor::{Hypervisor, SandboxSpec, Vm, VmState, VmmPids};
    use serde_json::json;

    use super::*;
    use crate::QemuOptions;

    #[test]
    fn clone_guids_are_random_version_4() {
        let (a, b) = (random_guid().unwrap(), random_guid().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    fn source_spec(dir: &Path) -> SandboxSpec {
        SandboxSpec {
            id: "src".into(),
            netns: None,
            config: HypervisorConfig {
                kernel: "/vmlinuz".into(),
                boot: Boot::TemplateSource { dir: dir.into() },
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn a_source_with_a_hot_plugged_device_is_not_saved() {
        let run_root = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (qemu, mut sandbox, _fake) = crate::tests::on_fake_qmp(QemuOptions {
            run_root: run_root.path().to_path_buf(),
            ..QemuOptions::default()
        })
        .await;
        let id = hypervisor::DeviceId::new("net0").unwrap();
        sandbox.hot.insert(
            id.clone(),
            hypervisor::DeviceInfo {
                id,
                kind: hypervisor::DeviceKind::Network,
                location: hypervisor::device::GuestLocation::Pci {
                    path: "02/00".into(),
                },
                hotplugged: true,
                mac: None,
                queue_pairs: Some(1),
                host: None,
            },
        );
        let hv = Vm::restored(
            qemu,
            source_spec(dir.path()),
            run_root.path().join("src"),
            VmState::Running,
            VmmPids::default(),
            sandbox,
        );
        let err = hv.save_template().await.unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        assert!(err.to_string().contains("net0"), "{err}");
        assert_eq!(hv.state().await, VmState::Running);
        assert!(!dir.path().join("state").exists());
    }

    /// A migration QEMU fails: the save says QEMU's reason, resumes the source (`cont`),
    /// removes the state file, and the VM stays running.
    #[tokio::test]
    async fn a_failed_migration_names_qemus_reason_and_the_source_runs_on() {
        let run_root = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (qemu, sandbox, mut fake) = crate::tests::on_fake_qmp(QemuOptions {
            run_root: run_root.path().to_path_buf(),
            ..QemuOptions::default()
        })
        .await;
        let hv = Arc::new(Vm::restored(
            qemu,
            source_spec(dir.path()),
            run_root.path().join("src"),
            VmState::Running,
            VmmPids::default(),
            sandbox,
        ));
        let save = tokio::spawn({
            let hv = hv.clone();
            async move { hv.save_template().await }
        });
        let ok = |id: Value| json!({ "return": {}, "id": id });
        let id = fake.expect("stop").await;
        fake.send(ok(id)).await;
        let (caps, _) = fake.recv().await;
        assert_eq!(caps["execute"], "migrate-set-capabilities");
        assert!(caps.to_string().contains("x-ignore-shared"), "{caps}");
        fake.send(ok(caps["id"].clone())).await;
        let (getfd, fds) = fake.recv().await;
        assert_eq!(getfd["execute"], "getfd");
        assert_eq!(fds.len(), 1, "the state file's fd comes with getfd");
        fake.send(ok(getfd["id"].clone())).await;
        let (migrate, _) = fake.recv().await;
        assert_eq!(migrate["arguments"]["uri"], "fd:template-state");
        fake.send(ok(migrate["id"].clone())).await;
        fake.send(json!({"event": "MIGRATION", "data": {"status": "failed"}}))
            .await;
        let id = fake.expect("query-migrate").await;
        fake.send(json!({"return": {"status": "failed",
            "error-desc": "Unable to write to file: No space left on device"}, "id": id}))
            .await;
        let id = fake.expect("cont").await;
        fake.send(ok(id)).await;
        let err = save.await.unwrap().unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains("No space left on device") && text.contains("Migrating the device state"),
            "{text}"
        );
        assert_eq!(hv.state().await, VmState::Running);
        assert!(
            !dir.path().join("state").exists(),
            "a half-written state is left"
        );
    }
}

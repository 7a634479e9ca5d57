//! A private containerd for the shim's tests, and the busybox image they run.
//!
//! [`Containerd::start`] runs Debian's `/usr/bin/containerd` with a `config.toml` of its own:
//! `root`, `state`, the gRPC and ttrpc sockets and the `opt` directory all live in a temp dir,
//! so the system's `/run/containerd/containerd.sock` and `/var/lib/containerd` are never
//! touched. (Shim sockets still go under `/run/containerd/s/`, named by a hash of the
//! containerd address, namespace and task id: distinct per private containerd.) Its stdout
//! and stderr, where containerd also copies what its shims log, go to a file in the temp dir,
//! printed when a test fails while the harness is alive. `ctr` commands run against it with a
//! namespace of its own ([`Containerd::ctr`], [`Containerd::ctr_output`]).
//!
//! [`Image`] builds an OCI image layout tar offline (a static busybox root filesystem with a
//! non-root user, as one plain tar layer, and an image config with entrypoint, command,
//! environment, working directory and user) and [`Containerd::import`] imports it with
//! `ctr image import`.
//!
//! [`Containerd::leftovers`] lists what a test left: shim, QEMU and virtiofsd processes,
//! `/run/netns/kata-<id>`, the shim's run directories, shim sockets, mounts under the temp dir
//! or the shim's run root. [`Containerd::finish`] stops containerd and fails when anything is
//! left. Dropped without `finish` (a test that failed half-way), it deletes its namespace's
//! tasks and containers through containerd, stops it, and kills a shim still running and
//! cleans up after it with the shim's own `delete`, as containerd does after a dead shim.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::containers::busybox_rootfs;

/// The shim's run root (sandbox records, VM directories).
pub const SHIM_RUN_ROOT: &str = "/run/kata";
/// containerd's runtime name of the shim under test.
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";
/// containerd's runtime name of runc.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The uid and name of the image's non-root user.
pub const IMAGE_USER: (u32, &str) = (1000, "kuser");

/// How a private containerd is started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A binary whose directory goes first on containerd's `PATH` (where containerd finds
    /// `containerd-shim-kata-v2`).
    pub shim: Option<PathBuf>,
    /// Environment added to containerd's (which its shims inherit): `KATA_CONF_FILE`,
    /// `GUEST_DIR`.
    pub env: Vec<(String, String)>,
    /// The CRI plugin's configuration; `None` disables the plugin (containerd starts faster).
    pub cri: Option<CriConfig>,
    /// A network namespace to run containerd in (`/run/netns/NAME`): containerd joins only
    /// that namespace (`nsenter --net`), so its mounts stay visible to the test.
    pub netns: Option<PathBuf>,
}

impl Options {
    /// With `binary`'s directory first on containerd's `PATH`.
    pub fn shim(mut self, binary: impl Into<PathBuf>) -> Self {
        self.shim = Some(binary.into());
        self
    }

    /// With `key=value` in containerd's environment.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.env.push((
            key.to_string(),
            value.as_ref().to_string_lossy().into_owned(),
        ));
        self
    }
}

/// What the CRI plugin is given. Both runtimes are declared: `kata`
/// (`io.containerd.kata.v2`) and `runc` (the default), since with any runtime configured
/// the plugin does not load unless `runc` is declared too.
#[derive(Debug, Clone, Default)]
pub struct CriConfig {
    /// The pause image (imported by the test into the `k8s.io` namespace).
    pub sandbox_image: String,
    /// CNI plugin binaries (`/usr/lib/cni`).
    pub cni_bin_dir: PathBuf,
    /// CNI network configurations.
    pub cni_conf_dir: PathBuf,
    /// The `ConfigPath` of the kata runtime's options, if any.
    pub kata_config: Option<PathBuf>,
    /// TOML appended to the configuration as it is (more tables).
    pub extra: String,
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    /// The command, for messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Ran {
    /// Its exit code (`None` when a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails unless it exited 0; its stdout.
    pub fn ok(self) -> Result<String> {
        ensure!(self.status.success(), "{self}");
        Ok(self.stdout)
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}`: {}, stdout {:?}, stderr {:?}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// One line of `ctr task ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// Task (container) id.
    pub id: String,
    /// The pid containerd reports.
    pub pid: u32,
    /// `RUNNING`, `STOPPED`, `CREATED`, `PAUSED`, `UNKNOWN`.
    pub status: String,
}

/// A private containerd; see the module docs.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    opts: Options,
    child: Option<Child>,
    namespace: String,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("dir", &self.dir())
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// How long containerd gets to answer `ctr version` after its start.
const READY: Duration = Duration::from_secs(30);
/// How long containerd gets to exit after SIGTERM before SIGKILL.
const STOP: Duration = Duration::from_secs(20);
/// How long what a test left may take to go (a shim exits a moment after its last answer).
const LINGER: Duration = Duration::from_secs(10);

impl Containerd {
    /// Writes the configuration, starts containerd and waits until it answers.
    pub fn start(opts: Options) -> Result<Containerd> {
        crate::require_root();
        ensure!(
            Path::new("/usr/bin/containerd").exists() && Path::new("/usr/bin/ctr").exists(),
            "containerd is not installed: /usr/bin/containerd and /usr/bin/ctr are missing \
             (run `make deps`: scripts/install-deps.sh installs Debian's containerd)"
        );
        let dir = tempfile::Builder::new()
            .prefix("ctrd-")
            .tempdir()
            .context("creating containerd's temp dir")?;
        let mut this = Containerd {
            dir: Some(dir),
            opts,
            child: None,
            namespace: crate::unique_name("ns"),
        };
        std::fs::write(this.dir().join("config.toml"), this.config_toml())
            .context("writing containerd's config.toml")?;
        this.spawn()?;
        Ok(this)
    }

    /// The temp dir holding containerd's configuration, root, state, sockets and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until finish").path()
    }

    /// The gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// The namespace `ctr` commands use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// containerd's log so far (its stdout and stderr, with its shims' logs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    fn config_toml(&self) -> String {
        let d = self.dir().display().to_string();
        let mut t = format!(
            "version = 2\n\
             root = \"{d}/root\"\n\
             state = \"{d}/state\"\n"
        );
        if self.opts.cri.is_none() {
            t.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
        }
        let _ = write!(
            t,
            "\n[grpc]\n  address = \"{d}/containerd.sock\"\n\
             \n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             \n[debug]\n  level = \"debug\"\n\
             \n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        if let Some(cri) = &self.opts.cri {
            let p = "plugins.\"io.containerd.grpc.v1.cri\"";
            // `restrict_oom_score_adj`: the plugin gives the pause container -998, which
            // needs CAP_SYS_RESOURCE; a machine without it (a container) fails its creation.
            let _ = write!(
                t,
                "\n[{p}]\n  sandbox_image = \"{}\"\n  restrict_oom_score_adj = true\n\
                 \n[{p}.containerd]\n  default_runtime_name = \"runc\"\n  snapshotter = \"overlayfs\"\n\
                 \n[{p}.containerd.runtimes.runc]\n  runtime_type = \"{RUNC_RUNTIME}\"\n\
                 \n[{p}.containerd.runtimes.kata]\n  runtime_type = \"{KATA_RUNTIME}\"\n",
                cri.sandbox_image
            );
            if let Some(path) = &cri.kata_config {
                let _ = write!(
                    t,
                    "\n[{p}.containerd.runtimes.kata.options]\n  ConfigPath = \"{}\"\n",
                    path.display()
                );
            }
            let _ = write!(
                t,
                "\n[{p}.cni]\n  bin_dir = \"{}\"\n  conf_dir = \"{}\"\n\n{}\n",
                cri.cni_bin_dir.display(),
                cri.cni_conf_dir.display(),
                cri.extra
            );
        }
        t
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir().join("containerd.log"))
            .context("opening containerd's log")?;
        let mut path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        if let Some(dir) = self.opts.shim.as_ref().and_then(|s| s.parent()) {
            path = format!("{}:{path}", dir.display());
        }
        let config = self.dir().join("config.toml");
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg("/usr/bin/containerd");
                c
            }
            None => Command::new("/usr/bin/containerd"),
        };
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", path)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting containerd")?;
        self.child = Some(child);
        let began = Instant::now();
        loop {
            let out = self.ctr_output(&["version"], None, Duration::from_secs(10))?;
            if out.status.success() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                self.child = None;
                bail!(
                    "containerd exited ({status}) before it answered; its log:\n{}",
                    self.log()
                );
            }
            if began.elapsed() > READY {
                bail!(
                    "containerd did not answer `ctr version` within {READY:?} ({out}); its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 20 s) and waits for its exit. Its
    /// shims keep running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let began = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let _ = status;
                return Ok(());
            }
            if began.elapsed() > STOP {
                let _ = child.kill();
                child.wait()?;
                bail!("containerd did not exit within {STOP:?} of SIGTERM: killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd only and starts it again on the same root, state and sockets.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// `ctr --address SOCK --namespace NS ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        cmd
    }

    /// Runs `ctr ARGS` with `stdin` (or none), killed after `timeout`.
    pub fn ctr_output(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Ran> {
        run_with_timeout(self.ctr(args), stdin, timeout)
    }

    /// Runs `ctr ARGS` (60 s at most); fails unless it exits 0. Its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        self.ctr_output(args, None, Duration::from_secs(60))?.ok()
    }

    /// Builds `image` into the temp dir and imports it with `ctr image import`.
    pub fn import(&self, image: &Image) -> Result<()> {
        let tar = self
            .dir()
            .join(format!("image-{}.tar", crate::unique_name("i")));
        image.write_layout_tar(&tar)?;
        let out = self.ctr_output(
            &["image", "import", tar.to_str().context("a UTF-8 path")?],
            None,
            Duration::from_secs(120),
        )?;
        std::fs::remove_file(&tar).ok();
        ensure!(out.status.success(), "importing {}: {out}", image.name);
        Ok(())
    }

    /// `ctr task ls`, parsed.
    pub fn tasks(&self) -> Result<Vec<TaskRow>> {
        let out = self.ctr_ok(&["task", "ls"])?;
        parse_task_ls(&out)
    }

    /// The status of task `id` in `ctr task ls`, if listed.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .tasks()?
            .into_iter()
            .find(|t| t.id == id)
            .map(|t| t.status))
    }

    /// Waits until `ctr task ls` shows task `id` with `status`, at most `limit`.
    pub fn wait_task_status(&self, id: &str, status: &str, limit: Duration) -> Result<()> {
        let began = Instant::now();
        loop {
            let now = self.task_status(id)?;
            if now.as_deref() == Some(status) {
                return Ok(());
            }
            if began.elapsed() > limit {
                bail!("task {id} is {now:?}, not {status}, after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Processes of the shims this containerd started (their command line names its
    /// address): `(pid, command line)`.
    pub fn shim_processes(&self) -> Vec<(u32, String)> {
        self.shims()
            .into_iter()
            .map(|(pid, argv)| (pid, argv.join(" ")))
            .collect()
    }

    fn shims(&self) -> Vec<(u32, Vec<String>)> {
        let address = self.address().display().to_string();
        processes()
            .into_iter()
            .filter(|(_, argv)| {
                argv.first().is_some_and(|a| {
                    a.rsplit('/')
                        .next()
                        .unwrap_or(a)
                        .starts_with("containerd-shim")
                }) && argv.iter().any(|a| a.contains(&address))
            })
            .collect()
    }

    /// The shim socket containerd names for task `id` in this namespace
    /// (`/run/containerd/s/<sha256 of ADDRESS/NS/ID>`).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let key = format!("{}/{}/{id}", self.address().display(), self.namespace);
        Path::new("/run/containerd/s").join(format!("{:x}", Sha256::digest(key.as_bytes())))
    }

    /// What is left of tasks `ids` and of this containerd's shims: each a line naming it.
    pub fn leftovers(&self, ids: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        let dir = self.dir().display().to_string();
        for (pid, cmdline) in self.shim_processes() {
            left.push(format!("shim process {pid}: {cmdline}"));
        }
        for (pid, argv) in processes() {
            let name = argv
                .first()
                .map(|a| a.rsplit('/').next().unwrap_or(a).to_string());
            let Some(name) = name else { continue };
            let vmm = name.starts_with("qemu-system") || name.ends_with("virtiofsd");
            let cmdline = argv.join(" ");
            if vmm && (cmdline.contains(&dir) || ids.iter().any(|id| mentions(&cmdline, id))) {
                left.push(format!("{name} process {pid}: {cmdline}"));
            }
        }
        for id in ids {
            for path in [
                PathBuf::from(format!("/run/netns/kata-{id}")),
                Path::new(SHIM_RUN_ROOT).join("sandboxes").join(id),
                Path::new(SHIM_RUN_ROOT).join("vm").join(id),
                self.shim_socket(id),
            ] {
                if path.exists() {
                    left.push(format!("{} exists", path.display()));
                }
            }
        }
        for mount in mount_points() {
            let ours = mount.starts_with(&dir)
                || (mount.starts_with(SHIM_RUN_ROOT) && ids.iter().any(|id| mentions(&mount, id)));
            if ours {
                left.push(format!("mount {mount}"));
            }
        }
        left
    }

    /// Stops containerd, checks nothing is left of tasks `ids` ([`Containerd::leftovers`], given
    /// up to 10 s to go) and removes the temp dir. What is left fails this, with containerd's
    /// log.
    pub fn finish(mut self, ids: &[&str]) -> Result<()> {
        self.stop()?;
        // A shim exits a moment after its last answer: what is left gets up to 10 s to go.
        let began = Instant::now();
        let mut left = self.leftovers(ids);
        while !left.is_empty() && began.elapsed() < LINGER {
            std::thread::sleep(Duration::from_millis(100));
            left = self.leftovers(ids);
        }
        if began.elapsed() > Duration::from_millis(500) {
            eprintln!("leftovers took {:?} to go", began.elapsed());
        }
        let log = self.log();
        // A socket left by a killed shim is reported above, then removed: later tests on
        // this machine must not meet it.
        for id in ids {
            let _ = std::fs::remove_file(self.shim_socket(id));
        }
        self.clean_up();
        ensure!(
            left.is_empty(),
            "left behind:\n  {}\ncontainerd's log:\n{log}",
            left.join("\n  ")
        );
        Ok(())
    }

    /// Through containerd, while it runs: deletes every task (`task delete -f`) and container
    /// of the namespace, so their shims tear their sandboxes down. For a test that failed
    /// half-way.
    fn delete_everything(&self) {
        if self.child.is_none() {
            return;
        }
        for task in self.tasks().unwrap_or_default() {
            let _ = self.ctr_output(
                &["task", "delete", "-f", &task.id],
                None,
                Duration::from_secs(60),
            );
        }
        let containers = self
            .ctr_output(&["container", "ls", "-q"], None, Duration::from_secs(10))
            .map(|out| out.stdout)
            .unwrap_or_default();
        for id in containers.split_whitespace() {
            let _ = self.ctr_output(&["container", "rm", id], None, Duration::from_secs(60));
        }
    }

    /// Kills what is left of this containerd (it, and its shims, each then cleaned up with its
    /// own `delete` as containerd would), unmounts what is mounted under the temp dir and
    /// removes it unless something stays mounted there.
    fn clean_up(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A shim still running is killed, then cleaned up as containerd does after a dead
        // shim: `SHIM -namespace NS -address A -id ID delete` in the task's bundle.
        for (pid, argv) in self.shims() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let began = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists() && began.elapsed() < STOP {
                std::thread::sleep(Duration::from_millis(50));
            }
            let flag = |name: &str| {
                argv.iter()
                    .position(|a| a == name)
                    .and_then(|i| argv.get(i + 1))
                    .cloned()
            };
            let (Some(ns), Some(id)) = (flag("-namespace"), flag("-id")) else {
                continue;
            };
            let bundle = self
                .dir()
                .join("state/io.containerd.runtime.v2.task")
                .join(&ns)
                .join(&id);
            let mut delete = Command::new(&argv[0]);
            delete
                .args(["-namespace", &ns, "-address"])
                .arg(self.address())
                .args(["-id", &id, "delete"])
                .current_dir(if bundle.is_dir() {
                    &bundle
                } else {
                    Path::new("/")
                })
                .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
            match run_with_timeout(delete, None, Duration::from_secs(60)) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("cleaning up after shim {pid}: {out}"),
                Err(e) => eprintln!("cleaning up after shim {pid}: {e:#}"),
            }
        }
        // runc's root for the namespace, which its shim leaves (empty).
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
        let Some(dir) = self.dir.take() else { return };
        let root = dir.path().display().to_string();
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&root))
            .collect();
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if mount_points().iter().any(|m| m.starts_with(&root)) {
            // Never remove through a mount: keep the directory.
            eprintln!("{root} keeps mounts: not removed");
            let _ = dir.keep();
        } else if let Err(e) = dir.close() {
            eprintln!("removing {root}: {e}");
        }
    }
}

impl Drop for Containerd {
    /// A test that fails half-way prints containerd's log and leaves nothing running.
    fn drop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "---- containerd's log ({}):\n{}\n---- end of containerd's log",
                self.dir().display(),
                self.log()
            );
        }
        self.delete_everything();
        let _ = self.stop();
        self.clean_up();
    }
}

/// Parses `ctr task ls` (`TASK PID STATUS` and a line per task).
pub fn parse_task_ls(out: &str) -> Result<Vec<TaskRow>> {
    let mut rows = Vec::new();
    for line in out.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 3, "unexpected `ctr task ls` line {line:?}");
        rows.push(TaskRow {
            id: f[0].to_string(),
            pid: f[1]
                .parse()
                .with_context(|| format!("the pid in {line:?}"))?,
            status: f[2].to_string(),
        });
    }
    Ok(rows)
}

/// Runs `cmd` with `stdin` written to it then closed (or `/dev/null`), its stdout and stderr
/// kept; kills it after `timeout` and fails with what it printed.
pub fn run_with_timeout(cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Ran> {
    let command = format!("{cmd:?}");
    let out_file = tempfile::tempfile()?;
    let err_file = tempfile::tempfile()?;
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(out_file.try_clone()?)
    .stderr(err_file.try_clone()?)
    .kill_on_drop(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut child = cmd.spawn().with_context(|| format!("running {command}"))?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A reader that ends early is its own business: its exit status tells.
            let _ = pipe.write_all(data).await;
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(Some(status?)),
            Err(_) => {
                let _ = child.kill().await;
                anyhow::Ok(None)
            }
        }
    })?;
    let read = |mut f: File| {
        use std::io::{Read, Seek};
        let mut s = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
        s
    };
    let (stdout, stderr) = (read(out_file), read(err_file));
    match status {
        Some(status) => Ok(Ran {
            command,
            status,
            stdout,
            stderr,
        }),
        None => {
            bail!("{command} did not end within {timeout:?}: stdout {stdout:?}, stderr {stderr:?}")
        }
    }
}

/// Every process's pid and argv (from `/proc`).
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.is_empty() {
            out.push((pid, argv));
        }
    }
    out
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, unescaped).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            m.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .collect()
}

/// Whether `text` names `id` as a whole word (not `id` followed or preceded by more of an id).
fn mentions(text: &str, id: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric();
    text.match_indices(id).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + id.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// An OCI image of a static busybox root filesystem, built offline.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its name (`localhost/kata-test/busybox:1`).
    pub name: String,
    /// The config's `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// The config's `Cmd`.
    pub cmd: Vec<String>,
    /// The config's `Env`.
    pub env: Vec<String>,
    /// The config's `WorkingDir` (made in the root filesystem when it is not empty).
    pub working_dir: String,
    /// The config's `User` (empty: root).
    pub user: String,
    /// Whether the image has its busybox layer (`false`: no layer at all).
    pub layer: bool,
}

impl Image {
    /// `localhost/kata-test/busybox:TAG`: runs `sh`, `PATH=/bin`, in `/`, as root.
    pub fn busybox(tag: &str) -> Image {
        Image {
            name: format!("localhost/kata-test/busybox:{tag}"),
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: String::new(),
            user: String::new(),
            layer: true,
        }
    }

    /// The layer: busybox, `/etc/passwd` and `/etc/group` with root and [`IMAGE_USER`] (its
    /// home directory owned by it), `/tmp` (1777), the working directory; a plain tar.
    fn layer_tar(&self) -> Result<Vec<u8>> {
        let tmp = tempfile::tempdir()?;
        let root = busybox_rootfs(tmp.path(), "layer")?;
        let (uid, user) = IMAGE_USER;
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/sh\n{user}:x:{uid}:{uid}:{user}:/home/{user}:/bin/sh\n"
            ),
        )?;
        std::fs::write(
            root.join("etc/group"),
            format!("root:x:0:\n{user}:x:{uid}:\n"),
        )?;
        std::fs::create_dir_all(root.join("root"))?;
        let home = root.join("home").join(user);
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::chown(&home, Some(uid), Some(uid))?;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        if !self.working_dir.is_empty() {
            std::fs::create_dir_all(root.join(self.working_dir.trim_start_matches('/')))?;
        }
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let mut entries: Vec<_> =
                std::fs::read_dir(root.join(&rel))?.collect::<std::io::Result<Vec<_>>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = rel.join(e.file_name());
                builder
                    .append_path_with_name(e.path(), &name)
                    .with_context(|| format!("adding {} to the layer", name.display()))?;
                if e.file_type()?.is_dir() {
                    stack.push(name);
                }
            }
        }
        Ok(builder.into_inner()?)
    }

    /// Writes the image as an OCI image layout tar (`oci-layout`, `index.json`,
    /// `blobs/sha256/...`) that `ctr image import` takes.
    pub fn write_layout_tar(&self, path: &Path) -> Result<()> {
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut add = |bytes: Vec<u8>| {
            let digest = format!("{:x}", Sha256::digest(&bytes));
            let size = bytes.len();
            blobs.push((digest.clone(), bytes));
            (format!("sha256:{digest}"), size)
        };
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        if self.layer {
            let (digest, size) = add(self.layer_tar()?);
            layers.push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest, "size": size,
            }));
            diff_ids.push(digest);
        }
        let mut config = json!({
            "Env": self.env, "Cmd": self.cmd, "WorkingDir": self.working_dir, "User": self.user,
        });
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = json!(self.entrypoint);
        }
        let config = json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (config_digest, config_size) = add(serde_json::to_vec(&config)?);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest, "size": config_size,
            },
            "layers": layers,
        });
        let (manifest_digest, manifest_size) = add(serde_json::to_vec(&manifest)?);
        let tag = self.name.rsplit(':').next().unwrap_or("latest");
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        });
        let mut out = tar::Builder::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut file = |name: &str, bytes: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            out.append_data(&mut h, name, bytes)
                .with_context(|| format!("adding {name} to {}", path.display()))
        };
        file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        file("index.json", &serde_json::to_vec(&index)?)?;
        for (digest, bytes) in &blobs {
            file(&format!("blobs/sha256/{digest}"), bytes)?;
        }
        out.into_inner()?.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ls_is_parsed() {
        let out =
            "TASK    PID      STATUS    \nabc     1234     RUNNING\nx-1     0        STOPPED\n";
        assert_eq!(
            parse_task_ls(out).unwrap(),
            [
                TaskRow {
                    id: "abc".into(),
                    pid: 1234,
                    status: "RUNNING".into()
                },
                TaskRow {
                    id: "x-1".into(),
                    pid: 0,
                    status: "STOPPED".into()
                },
            ]
        );
        assert!(parse_task_ls("TASK PID STATUS\n").unwrap().is_empty());
    }

    #[test]
    fn an_id_is_mentioned_only_as_a_whole_word() {
        assert!(mentions("/run/x/vm/k12-1/qmp.sock", "k12-1"));
        assert!(mentions("-name sandbox-k12-1", "k12-1"));
        assert!(!mentions("/run/x/vm/k12-10/qmp.sock", "k12-1"));
        assert!(!mentions("ak12-1", "k12-1"));
    }
}

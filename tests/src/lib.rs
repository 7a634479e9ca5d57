//! Shared fixtures of the workspace integration tests.
//!
//! VM scenarios are written once, in [`scenarios`], against `Arc<dyn Hypervisor>`; each
//! backend's test file runs them with its own [`Backend`]. Every VM test works in a network
//! namespace it creates and removes, and checks what a user could observe: ping answers from
//! the namespace, the guest agent's view, `/proc/PID/fd`, leftover devices and files.

pub mod bench;
pub mod cni;
pub mod containerd;
pub mod containers;
pub mod cri;
pub mod qemu;
pub mod scenarios;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guest_agent::client::AgentClient;
use hypervisor::device::{NetworkBackend, NetworkConfig};
use hypervisor::{
    AgentAddress, Device, DeviceManager, Hypervisor, HypervisorConfig, MacAddress, SandboxSpec,
    VmmPids,
};

/// Fails the calling test, with the reason, unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces and TAP devices (run `sudo make test`)"
    );
}

/// An error and its sources, one per line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push('\n');
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// Whether the CPU offers hardware virtualization (`vmx` or `svm` in `/proc/cpuinfo`). A
/// nested KVM without them runs small guests but cannot run a stock Linux kernel to the end.
pub fn hardware_virtualization() -> bool {
    hypervisor::host::probe_hardware_virtualization().unwrap_or(false)
}

/// The guest kernel and initramfs built by `make guest-assets` (or `make
/// guest-assets-debian`).
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// bzImage.
    pub kernel: PathBuf,
    /// initramfs with busybox, the agent (and with Debian's kernel, its modules).
    pub initrd: PathBuf,
}

/// The freestanding test guest (`make test-guest`): `$TESTGUEST_ELF` or the repository's
/// `.cache/testguest/testguest.elf`; fails the test with the command to run when missing.
pub fn test_guest() -> PathBuf {
    let path = std::env::var_os("TESTGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/testguest/testguest.elf")
        });
    let path = path.canonicalize().unwrap_or(path);
    assert!(
        path.exists(),
        "the test guest {} is missing: run `make test-guest` first",
        path.display()
    );
    path
}

impl GuestAssets {
    /// The default guest (its kernel built for the job): in `$GUEST_DIR` or the repository's
    /// `.cache/guest`; fails the test with the command to run when it is missing.
    pub fn find() -> GuestAssets {
        Self::find_in("GUEST_DIR", "guest", "make guest-assets")
    }

    /// The guest on Debian's packaged kernel, with its modules: in `$GUEST_DEBIAN_DIR` or the
    /// repository's `.cache/guest-debian`; fails the test with the command to run when it is
    /// missing.
    pub fn debian() -> GuestAssets {
        Self::find_in(
            "GUEST_DEBIAN_DIR",
            "guest-debian",
            "make guest-assets-debian",
        )
    }

    fn find_in(var: &str, cache: &str, make: &str) -> GuestAssets {
        let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache")
                .join(cache)
        });
        let dir = dir.canonicalize().unwrap_or(dir);
        let assets = GuestAssets {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.img"),
        };
        assert!(
            assets.kernel.exists() && assets.initrd.exists(),
            "guest assets are missing in {}: run `{make}` first",
            dir.display()
        );
        assets
    }

    /// The directory the guest was built in (its `VERSION` manifest, `config`, `rootfs`).
    pub fn dir(&self) -> &Path {
        self.kernel
            .parent()
            .expect("the kernel is a file in the guest directory")
    }

    /// The kernel's build configuration: `$GUEST_KERNEL_CONFIG`, or the `config` that
    /// `make guest-assets` writes beside the kernel.
    pub fn kernel_config(&self) -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("GUEST_KERNEL_CONFIG") {
            return Some(PathBuf::from(path));
        }
        Some(self.dir().join("config")).filter(|p| p.is_file())
    }

    /// The value of `option` (`CONFIG_...`) in the kernel's build configuration: `Ok(None)`
    /// when it is not set, `Err` when no configuration can be found.
    pub fn kernel_option(&self, option: &str) -> Result<Option<String>, String> {
        let path = self.kernel_config().ok_or_else(|| {
            format!(
                "no build configuration found for {} (set GUEST_KERNEL_CONFIG to its .config)",
                self.kernel.display()
            )
        })?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let prefix = format!("{option}=");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(String::from))
    }
}

/// A logger whose lines go through the test harness's capture.
pub fn test_logger() -> slog::Logger {
    struct Captured;
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            eprint!("{}", String::from_utf8_lossy(buf));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let decorator = slog_term::PlainSyncDecorator::new(Captured);
    let drain = slog_term::FullFormat::new(decorator).build();
    slog::Logger::root(std::sync::Mutex::new(drain).fuse(), slog::o!())
}

use slog::Drain as _;

/// A name unique in this machine and run: `PREFIX-PID-N`, at most 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}-{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "{name} is too long for an interface");
    name
}

/// What a backend's test file provides to the shared scenarios.
pub trait Backend: Send + Sync {
    /// A fresh backend handle, with its run files under `run_root`.
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor>;
    /// A configuration that boots the test guest.
    fn config(&self, assets: &GuestAssets) -> HypervisorConfig;
    /// Whether the scenarios can boot a guest on this host; `Err` gives the reason.
    fn can_boot(&self) -> Result<(), String>;
    /// How [`Sandbox::tap`] hands a TAP to this backend.
    fn tap_handover(&self) -> TapHandover {
        TapHandover::Fds
    }
    /// Devices the guest needs besides the scenario's NICs (the agent's vsock, say),
    /// cold-plugged right after `prepare`.
    fn base_devices(&self) -> Vec<Device> {
        Vec::new()
    }
    /// Whether `stop` asks the guest to power off (ACPI power button) before the VMM ends, so
    /// the guest's console shows `reboot: Power down`.
    fn stop_powers_the_guest_off(&self) -> bool {
        true
    }
}

/// How a test TAP reaches the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapHandover {
    /// The test opens the TAP's queues and hands the fds over
    /// ([`NetworkBackend::TapFds`]); the TAP goes away with the last fd.
    Fds,
    /// The test creates a persistent TAP, closes its own fds and names it
    /// ([`NetworkBackend::TapName`]); the VMM opens it in the sandbox's namespace. Teardown
    /// checks the VMM let go of it (no carrier), then deletes it.
    Name,
}

/// One sandbox under test: its namespace, its hypervisor, its agent.
pub struct Sandbox {
    /// The backend handle.
    pub hv: Arc<dyn Hypervisor>,
    /// The sandbox's devices: every device a scenario adds goes through the manager, which
    /// decides cold or hot plug.
    pub devices: DeviceManager,
    ns: Option<netdev::NetNs>,
    /// Sandbox id.
    pub id: String,
    /// Run directories live here.
    pub run_root: tempfile::TempDir,
    agent: Option<AgentClient>,
    vmm_pid: Option<u32>,
    /// The VMM's process and threads, read once it started.
    pids: Option<VmmPids>,
    handover: TapHandover,
    /// Persistent TAPs this sandbox created ([`TapHandover::Name`]).
    persistent_taps: std::sync::Mutex<Vec<String>>,
}

impl Drop for Sandbox {
    /// A test that fails half-way must not leave its VMM running: kill a VMM child process
    /// that is still alive. (The namespace and the run root remove themselves.)
    fn drop(&mut self) {
        if let Some(pid) = self.vmm_pid.filter(|p| *p != std::process::id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id).finish()
    }
}

/// A host-side TAP for a guest NIC, with an address in the sandbox namespace.
#[derive(Debug, Clone)]
pub struct TestNic {
    /// The TAP's name.
    pub tap: String,
    /// Guest MAC.
    pub mac: MacAddress,
    /// Host address on the TAP (`10.N.0.1`).
    pub host_ip: String,
    /// Address the guest will get (`10.N.0.2`).
    pub guest_ip: String,
    config: Option<NetworkConfig>,
}

impl TestNic {
    /// The device config to hand to the hypervisor. It carries the test's only copies of the
    /// TAP fds, so once the hypervisor has its own, the TAP lives exactly as long as the VMM
    /// holds it. Panics when taken twice.
    pub fn take_config(&mut self) -> NetworkConfig {
        self.config
            .take()
            .expect("the NIC config was already taken")
    }

    /// [`TestNic::take_config`] as a device configuration for the [`DeviceManager`].
    pub fn network(&mut self) -> hypervisor::DeviceConfig {
        hypervisor::DeviceConfig::Network(self.take_config())
    }

    /// [`TestNic::take_config`] as a network device with the id `id`.
    pub fn device(&mut self, id: &str) -> Device {
        Device {
            id: hypervisor::DeviceId::new(id).expect("a valid device id"),
            config: hypervisor::DeviceConfig::Network(self.take_config()),
        }
    }
}

impl Sandbox {
    /// The sandbox's network namespace.
    pub fn ns(&self) -> &netdev::NetNs {
        self.ns.as_ref().expect("present until teardown")
    }

    /// Creates a namespace and prepares a VM in it with `config`.
    pub async fn prepare(backend: &dyn Backend, config: HypervisorConfig) -> Result<Sandbox> {
        require_root();
        let id = unique_name("sb");
        let ns = netdev::NetNs::create(&id).context("creating the sandbox namespace")?;
        Self::prepare_in(backend, config, id, ns).await
    }

    /// Prepares a VM with `config` in an existing namespace, which the sandbox then owns.
    pub async fn prepare_in(
        backend: &dyn Backend,
        config: HypervisorConfig,
        id: String,
        ns: netdev::NetNs,
    ) -> Result<Sandbox> {
        require_root();
        let run_root = tempfile::tempdir()?;
        let hv = backend.create(run_root.path());
        let spec = SandboxSpec {
            id: id.clone(),
            netns: Some(ns.path().to_path_buf()),
            config,
        };
        hv.prepare(&spec).await.context("prepare")?;
        let devices = DeviceManager::new(hv.clone());
        for device in backend.base_devices() {
            devices
                .add(device.config.clone())
                .await
                .with_context(|| format!("cold-plugging {}", device.id))?;
        }
        Ok(Sandbox {
            devices,
            hv,
            ns: Some(ns),
            id,
            run_root,
            agent: None,
            vmm_pid: None,
            pids: None,
            handover: backend.tap_handover(),
            persistent_taps: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Creates a TAP with `queues` queues in the namespace, gives it `10.SUBNET.0.1/24`, and
    /// returns the device config that hands it to the VM the way the backend takes it
    /// ([`Backend::tap_handover`]).
    pub fn tap(&self, subnet: u8, queues: u16) -> Result<TestNic> {
        let name = format!("tap{subnet}");
        let persistent = self.handover == TapHandover::Name;
        let tap = netdev::TapBuilder::new(&name)
            .queues(usize::from(queues))
            .multi_queue(queues > 1)
            .persist(persistent)
            .netns(self.ns().path())
            .up(true)
            .create()
            .with_context(|| format!("creating {name}"))?;
        if persistent {
            self.persistent_taps
                .lock()
                .expect("not poisoned")
                .push(name.clone());
        }
        let host_ip = format!("10.{subnet}.0.1");
        self.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &name])?;
        let mac = MacAddress([0x02, 0, 0, 0, subnet, 0x02]);
        let backend = match self.handover {
            TapHandover::Fds => NetworkBackend::TapFds {
                name: name.clone(),
                queues: tap.into_queues().into_iter().map(Arc::new).collect(),
            },
            // Our fds close here; the persistent device stays for the VMM to open.
            TapHandover::Name => {
                drop(tap);
                NetworkBackend::TapName(name.clone())
            }
        };
        let config = NetworkConfig {
            backend,
            guest_mac: mac,
            queue_pairs: queues,
            queue_size: None,
            mtu: None,
        };
        Ok(TestNic {
            tap: name,
            mac,
            host_ip,
            guest_ip: format!("10.{subnet}.0.2"),
            config: Some(config),
        })
    }

    /// Runs `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run("ip", &[&["-n", self.ns().name()], args].concat())
    }

    /// Boots and waits for the agent. A VM that exits meanwhile fails this at once, naming
    /// its exit and the error the guest's init printed on the console, if any.
    pub async fn start(&mut self) -> Result<()> {
        self.start_vm().await?;
        let address = self.hv.agent_address().await?;
        let ready = async {
            let mut agent = match address {
                AgentAddress::VirtioSerial { path } => AgentClient::connect_serial(&path).await?,
                AgentAddress::Vsock { cid, port } => AgentClient::connect_vsock(cid, port).await?,
                AgentAddress::HybridVsock { path, port } => {
                    AgentClient::connect_hybrid_vsock(&path, port).await?
                }
            };
            agent
                .wait_ready(Duration::from_secs(90))
                .await
                .context("waiting for the guest agent")?;
            anyhow::Ok(agent)
        };
        let agent = tokio::select! {
            agent = ready => agent?,
            exit = self.hv.wait_exit() => {
                let exit = exit.context("waiting for the VM to exit")?;
                let console = self.hv.console_log().await;
                match console.as_deref().and_then(guest_agent::console::init_failure_in) {
                    Some(why) => bail!("the guest failed to start: {why} (VM exit: {exit})"),
                    None => bail!("the VM exited before its agent answered: {exit}"),
                }
            }
        };
        self.agent = Some(agent);
        Ok(())
    }

    /// Boots, without waiting for an agent (for guests that have none).
    pub async fn start_vm(&mut self) -> Result<()> {
        self.hv
            .start(Duration::from_secs(60))
            .await
            .context("start")?;
        self.pids = self.hv.pids().await.ok();
        self.vmm_pid = self.pids.as_ref().map(|p| p.vmm);
        Ok(())
    }

    /// The connected agent.
    pub fn agent(&mut self) -> &mut AgentClient {
        self.agent.as_mut().expect("started")
    }

    /// Runs `argv` in the guest through the agent's `exec` (20 s limit): its exit code,
    /// stdout and stderr.
    pub async fn guest_run(&mut self, argv: &[&str]) -> Result<guest_agent::protocol::ExecOutput> {
        let out = self
            .agent()
            .exec(
                guest_agent::protocol::ExecRequest {
                    argv: argv.iter().map(|a| a.to_string()).collect(),
                    timeout_ms: Some(20_000),
                },
                Duration::from_secs(30),
            )
            .await?;
        Ok(out)
    }

    /// [`guest_run`](Self::guest_run) that must exit 0: its stdout.
    pub async fn guest_ok(&mut self, argv: &[&str]) -> Result<String> {
        let out = self.guest_run(argv).await?;
        ensure!(
            out.exit_code == Some(0),
            "{argv:?} failed in the guest: {}",
            out.stderr
        );
        Ok(out.stdout)
    }

    /// Configures the guest NIC of `nic` through the agent.
    pub async fn configure(&mut self, nic: &TestNic) -> Result<String> {
        let done = self
            .agent()
            .configure_interface(
                guest_agent::protocol::InterfaceConfig {
                    mac: nic.mac.to_string(),
                    set_mac: None,
                    addresses: vec![format!("{}/24", nic.guest_ip)],
                    mtu: None,
                    routes: vec![],
                },
                Duration::from_secs(20),
            )
            .await
            .context("configure_interface")?;
        Ok(done.name)
    }

    /// Configures the guest NIC of `nic` once the guest has probed it (a hot-plugged NIC
    /// shows up a moment after the hotplug): retries every 250 ms for 60 s.
    pub async fn configure_when_seen(&mut self, nic: &TestNic) -> Result<()> {
        let began = Instant::now();
        loop {
            match self.configure(nic).await {
                Ok(_) => return Ok(()),
                Err(e) if began.elapsed() > Duration::from_secs(60) => {
                    return Err(e.context("the guest never showed the hot-plugged NIC"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Pings `addr` from the namespace until it answers, at most `limit`.
    pub async fn wait_ping(&self, addr: &str, limit: Duration) -> Result<()> {
        let began = Instant::now();
        loop {
            if self.ping_once(addr).await {
                return Ok(());
            }
            if began.elapsed() > limit {
                bail!("{addr} did not answer ping within {limit:?}");
            }
        }
    }

    /// One ping with a one-second deadline.
    pub async fn ping_once(&self, addr: &str) -> bool {
        tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns().name(),
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                addr,
            ])
            .output()
            .await
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Names of TUN/TAP devices in the namespace.
    pub fn taps(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-j", "link", "show", "type", "tun"])?;
        let links: serde_json::Value =
            serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect())
    }

    /// Stops, cleans up, and checks nothing is left: no VMM process (or, for a VMM in this
    /// process, none of its threads), no TAP, no run directory. Then removes the namespace.
    pub async fn teardown(mut self, pid: Option<u32>) -> Result<()> {
        // From here on the checks below decide; Drop must not kill a reused pid.
        self.vmm_pid = None;
        // The agent's socket is closed before the fd checks, not when its tasks next run.
        if let Some(mut agent) = self.agent.take() {
            agent.close().await;
        }
        self.hv.stop().await.context("stop")?;
        self.hv.cleanup().await.context("cleanup")?;
        match pid {
            Some(pid) if pid == std::process::id() => {
                // An in-process VMM: its threads must be gone, not the process.
                let pids = self
                    .pids
                    .take()
                    .context("the VMM's threads were never read")?;
                for tid in pids.vcpus.iter().chain([&pids.main_thread]) {
                    ensure!(
                        !Path::new(&format!("/proc/self/task/{tid}")).exists(),
                        "VMM thread {tid} is still alive after cleanup"
                    );
                }
            }
            Some(pid) => ensure!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "VMM process {pid} is still alive after cleanup"
            ),
            None => {}
        }
        let run_dir = self.run_root.path().join(&self.id);
        ensure!(!run_dir.exists(), "{} is left behind", run_dir.display());
        // A persistent TAP outlives the VMM: it must have let go of it (no queue attached,
        // so no carrier), and then the test deletes it.
        let persistent = std::mem::take(&mut *self.persistent_taps.lock().expect("not poisoned"));
        for name in persistent {
            let out = self.ip(&["-j", "link", "show", "dev", &name])?;
            ensure!(
                out.contains("\"NO-CARRIER\""),
                "the VMM still holds TAP {name} after cleanup: {out}"
            );
            netdev::delete_tap(&name, Some(self.ns().path()))
                .with_context(|| format!("deleting TAP {name}"))?;
        }
        // A non-persistent TAP goes away when its last fd closes.
        let taps = self.taps()?;
        ensure!(
            taps.is_empty(),
            "TAP devices left in the namespace: {taps:?}"
        );
        if let Some(ns) = self.ns.take() {
            ns.delete().context("deleting the namespace")?;
        }
        Ok(())
    }
}

/// The machine a benchmark ran on, for its report: cores, CPU model, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let kernel = run("uname", &["-r"]).unwrap_or_default();
    format!(
        "{} cores, {cpu}, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// Runs a command, returning stdout, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Targets of `/proc/PID/fd/*`.
pub fn fd_targets(pid: u32) -> Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let n: i32 = entry.file_name().to_string_lossy().parse()?;
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        out.push((n, target));
    }
    out.sort();
    Ok(out)
}

/// Keeps a fd the test opened (to check it does not leak into the VMM).
pub fn marker_fd(dir: &Path) -> Result<OwnedFd> {
    let f = std::fs::File::create(dir.join("marker-not-for-the-vmm"))?;
    Ok(f.into())
}

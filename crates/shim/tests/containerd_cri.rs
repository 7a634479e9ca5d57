//! A Kubernetes-style pod through containerd's CRI plugin, as the kubelet makes one: a CRI v1
//! client on a private containerd runs RunPodSandbox (the pod network made by the plugin
//! with the real `bridge` CNI plugin and `host-local` IPAM), creates and starts two
//! containers, reads their CRI logs, pings the pod, then StopPodSandbox and
//! RemovePodSandbox, and checks nothing is left.
//!
//! containerd runs inside a "node" network namespace of the test (`nsenter --net`), so the
//! CNI bridge, its gateway address and the pod's veth peer live there, never in the root
//! namespace; the pod is pinged from the node namespace. The images (busybox, and the pause
//! image: busybox sleeping forever) are built offline and imported into `k8s.io`; nothing is
//! pulled.
//!
//! `runc`: the same flow with containerd's runc shim, which proves the harness, the CNI
//! configuration and the client. `kata`: the pod is one VM (one shim process, one QEMU), the
//! pod's eth0 is redirected to the VM's TAP, and after RemovePodSandbox no shim, QEMU, TAP,
//! qdisc, pod namespace, mount or run directory is left.
//!
//! Needs root, containerd and runc, the CNI plugins (`make deps`) and, for `kata`, the guest
//! assets.
#![cfg(feature = "qemu")]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use workspace_tests::containerd::{Containerd, CriConfig, Image, Options};
use workspace_tests::cri::{self, api, Cri};
use workspace_tests::{require_root, run, unique_name};

mod common;

use common::{config, guest_dir, SHIM};

/// One containerd (and, for `kata`, one VM) at a time in this binary.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long a container gets to print its first lines (a VM boots under TCG first).
const LOG_LIMIT: Duration = Duration::from_secs(120);
/// How long a CRI call that may start or stop a VM gets (a VM boots under TCG).
const VM_LIMIT: Duration = Duration::from_secs(240);
/// How long any other CRI call gets.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// How long the pod gets to answer ping.
const PING_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_pod_of_two_containers_runs_with_the_runc_handler() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    pod_flow(Handler::Runc, 1).unwrap_or_else(|e| panic!("{e:?}"));
}

#[test]
fn a_pod_of_two_containers_runs_in_one_vm_with_the_kata_handler() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    pod_flow(Handler::Kata, 2).unwrap_or_else(|e| panic!("{e:?}"));
}

/// The CRI runtime handler a pod asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    Runc,
    Kata,
}

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Runc => "runc",
            Handler::Kata => "kata",
        }
    }
}

/// A pod the test made: removed through CRI if the test fails before it does.
struct Pod {
    id: String,
    /// The pod's network namespace (`/var/run/netns/cni-...`), from the sandbox's spec.
    netns: PathBuf,
    /// Its containers' ids.
    containers: Vec<String>,
}

fn pod_flow(handler: Handler, net: u8) -> Result<()> {
    require_root();
    let tag = unique_name("cri");
    let node =
        netdev::NetNs::create(&unique_name("node")).context("creating the node namespace")?;
    // The CRI plugin's stream server listens on the node's 127.0.0.1.
    run("ip", &["-n", node.name(), "link", "set", "lo", "up"])?;
    let work = tempfile::Builder::new().prefix("cri-").tempdir()?;
    let cni_conf = work.path().join("cni");
    let subnet = format!("10.{}.{net}.0/24", 100 + std::process::id() % 100);
    cri::write_bridge_conflist(
        &cni_conf,
        &format!("net-{tag}"),
        "cni0",
        &subnet,
        &work.path().join("ipam"),
    )?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;

    let pause = cri::pause_image(&tag);
    let busybox = Image::busybox(&tag);
    let mut opts = Options {
        cri: Some(CriConfig {
            sandbox_image: pause.name.clone(),
            cni_bin_dir: PathBuf::from(workspace_tests::cni::CNI_PATH),
            cni_conf_dir: cni_conf.clone(),
            ..Default::default()
        }),
        netns: Some(node.path().to_path_buf()),
        ..Default::default()
    }
    .shim(SHIM);
    if handler == Handler::Kata {
        opts = opts
            .env("KATA_CONF_FILE", config("configuration-qemu.toml"))
            .env("GUEST_DIR", guest_dir());
    }
    let containerd = Containerd::start(opts)?;
    cri::import_k8s(&containerd, &pause)?;
    cri::import_k8s(&containerd, &busybox)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = rt.block_on(Cri::connect(&containerd.address()))?;
    let mut pods: Vec<Pod> = Vec::new();
    let flow = run_pod(
        &rt,
        &client,
        &containerd,
        handler,
        &tag,
        &busybox.name,
        &logs,
        &node,
        &subnet,
        &mut pods,
    );
    if flow.is_err() {
        // Best effort, so that containerd's end leaves no VM behind the failure.
        for pod in &pods {
            let mut runtime = client.runtime.clone();
            let id = pod.id.clone();
            let stop = api::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            let _ = cri::call(
                &rt,
                "StopPodSandbox",
                CALL_LIMIT,
                runtime.stop_pod_sandbox(stop),
            );
            let remove = api::RemovePodSandboxRequest { pod_sandbox_id: id };
            let _ = cri::call(
                &rt,
                "RemovePodSandbox",
                CALL_LIMIT,
                runtime.remove_pod_sandbox(remove),
            );
        }
    }
    if let Err(e) = flow {
        let log = containerd.log();
        let tail: Vec<&str> = log.lines().rev().take(200).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(e.context(format!(
            "the pod flow failed; the end of containerd's log:\n{}",
            tail.join("\n")
        )));
    }
    drop(client);
    drop(rt);

    // After RemovePodSandbox: containerd's end finds no shim, QEMU or virtiofsd of the pod,
    // no mount under its temp dir or the shim's run root, no run directory; then the pod's
    // and the node's namespaces hold nothing of the pod.
    let pod = pods.pop().context("the flow made a pod")?;
    let ids: Vec<&str> = [pod.id.as_str()]
        .into_iter()
        .chain(pod.containers.iter().map(String::as_str))
        .collect();
    let shim_sockets: Vec<PathBuf> = ids
        .iter()
        .map(|id| cri::shim_socket(&containerd, id))
        .collect();
    containerd.finish(&ids)?;
    for socket in shim_sockets {
        ensure!(
            !socket.exists(),
            "a shim socket {} is left",
            socket.display()
        );
    }
    ensure!(
        !pod.netns.exists(),
        "the pod's network namespace {} is left",
        pod.netns.display()
    );
    let left = vmm_processes(&pod.id);
    ensure!(left.is_empty(), "VMM processes left: {left:?}");
    let taps = run(
        "ip",
        &["-n", node.name(), "-o", "link", "show", "type", "tun"],
    )?;
    ensure!(taps.trim().is_empty(), "TAPs left in the node: {taps}");
    let veths = run(
        "ip",
        &["-n", node.name(), "-o", "link", "show", "type", "veth"],
    )?;
    ensure!(
        veths.trim().is_empty(),
        "the pod's veth is left in the node: {veths}"
    );
    let qdiscs = run("tc", &["-n", node.name(), "qdisc", "show"])?;
    ensure!(
        !qdiscs.contains("ingress"),
        "an ingress qdisc is left in the node: {qdiscs}"
    );
    let work_path = work.path().to_path_buf();
    work.close().context("removing the test's work directory")?;
    ensure!(!work_path.exists(), "{} is left", work_path.display());
    let node_path = node.path().to_path_buf();
    node.delete().context("deleting the node namespace")?;
    ensure!(!node_path.exists(), "{} is left", node_path.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_pod(
    rt: &tokio::runtime::Runtime,
    client: &Cri,
    containerd: &Containerd,
    handler: Handler,
    tag: &str,
    image: &str,
    logs: &Path,
    node: &netdev::NetNs,
    subnet: &str,
    pods: &mut Vec<Pod>,
) -> Result<()> {
    let mut runtime = client.runtime.clone();
    let version = cri::call(
        rt,
        "Version",
        CALL_LIMIT,
        runtime.version(api::VersionRequest {
            version: "v1".into(),
        }),
    )?;
    ensure!(
        version.runtime_name == "containerd" && version.runtime_api_version == "v1",
        "not containerd's CRI v1: {version:?}"
    );
    wait_network_ready(rt, client)?;

    // RunPodSandbox: the plugin makes the pod's namespace, runs the bridge plugin in it and
    // starts the pause container with the handler's runtime (for kata: the VM).
    let pod_config = cri::pod_config(tag, logs);
    let began = Instant::now();
    let run = api::RunPodSandboxRequest {
        config: Some(pod_config.clone()),
        runtime_handler: handler.name().into(),
    };
    let pod_id =
        cri::call(rt, "RunPodSandbox", VM_LIMIT, runtime.run_pod_sandbox(run))?.pod_sandbox_id;
    eprintln!(
        "RunPodSandbox ({}) took {:?}",
        handler.name(),
        began.elapsed()
    );
    let status = cri::call(
        rt,
        "PodSandboxStatus",
        CALL_LIMIT,
        runtime.pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.clone(),
            verbose: true,
        }),
    )?;
    let netns = sandbox_netns(&status.info).context("the pod's network namespace")?;
    pods.push(Pod {
        id: pod_id.clone(),
        netns: netns.clone(),
        containers: Vec::new(),
    });
    let sandbox = status.status.context("PodSandboxStatus has no status")?;
    ensure!(
        sandbox.state == api::PodSandboxState::SandboxReady as i32,
        "the pod is not ready: {sandbox:?}"
    );
    ensure!(sandbox.runtime_handler == handler.name(), "{sandbox:?}");
    let ip = sandbox
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .filter(|ip| !ip.is_empty())
        .context("the pod has no IP")?;
    let prefix = subnet.trim_end_matches("0/24");
    ensure!(
        ip.starts_with(prefix),
        "the pod's IP {ip} is not in the CNI subnet {subnet}"
    );

    // Two containers in the pod: one prints to stdout and stderr, the other what its eth0
    // has (the address CNI gave the pod).
    let c1 = cri::container_config(
        "c1",
        image,
        &[
            "sh",
            "-c",
            "echo hello from $CONTAINER_NAME; echo to stderr >&2; exec sleep infinity",
        ],
    );
    let c2 = cri::container_config(
        "c2",
        image,
        &[
            "sh",
            "-c",
            "echo hello from $CONTAINER_NAME; busybox ip -o -4 addr show eth0; exec sleep infinity",
        ],
    );
    for config in [c1, c2] {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let create = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        let id = cri::call(
            rt,
            &format!("CreateContainer {name}"),
            VM_LIMIT,
            runtime.create_container(create),
        )?
        .container_id;
        if let Some(pod) = pods.last_mut() {
            pod.containers.push(id.clone());
        }
        let start = api::StartContainerRequest { container_id: id };
        cri::call(
            rt,
            &format!("StartContainer {name}"),
            VM_LIMIT,
            runtime.start_container(start),
        )?;
    }

    // The container logs: CRI log lines in the files the pod config names.
    let inet = format!("inet {ip}/24");
    let c1_log = cri::wait_log(&logs.join("c1.log"), LOG_LIMIT, |lines| {
        cri::has_line(lines, "stdout", "hello from c1")
            && cri::has_line(lines, "stderr", "to stderr")
    })?;
    let c2_log = cri::wait_log(&logs.join("c2.log"), LOG_LIMIT, |lines| {
        cri::has_line(lines, "stdout", "hello from c2")
            && lines
                .iter()
                .any(|l| l.stream == "stdout" && l.text.contains(&inet))
    })?;
    eprintln!("c1's log: {c1_log:?}; c2's log: {c2_log:?}");

    let in_pod = || api::ListContainersRequest {
        filter: Some(api::ContainerFilter {
            pod_sandbox_id: pod_id.clone(),
            ..Default::default()
        }),
    };
    let listed = cri::call(
        rt,
        "ListContainers",
        CALL_LIMIT,
        runtime.list_containers(in_pod()),
    )?
    .containers;
    ensure!(listed.len() == 2, "the pod lists {listed:?}");
    for c in &listed {
        ensure!(
            c.state == api::ContainerState::ContainerRunning as i32,
            "a container is not running: {c:?}"
        );
    }

    // The node reaches the pod on the address CNI gave it.
    wait_ping(node, &ip, PING_LIMIT)?;

    if handler == Handler::Kata {
        check_one_vm(containerd, &pod_id, &netns)?;
    }

    // StopPodSandbox stops both containers and the pod, and tears down its network;
    // RemovePodSandbox removes them.
    let stop = api::StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    };
    cri::call(
        rt,
        "StopPodSandbox",
        VM_LIMIT,
        runtime.stop_pod_sandbox(stop),
    )?;
    let listed = cri::call(
        rt,
        "ListContainers after StopPodSandbox",
        CALL_LIMIT,
        runtime.list_containers(in_pod()),
    )?
    .containers;
    ensure!(listed.len() == 2, "the pod lists {listed:?}");
    for c in &listed {
        ensure!(
            c.state == api::ContainerState::ContainerExited as i32,
            "a container is not exited after StopPodSandbox: {c:?}"
        );
    }
    let remove = api::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    };
    cri::call(
        rt,
        "RemovePodSandbox",
        VM_LIMIT,
        runtime.remove_pod_sandbox(remove),
    )?;
    let left = cri::call(
        rt,
        "ListPodSandbox",
        CALL_LIMIT,
        runtime.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
    )?
    .items;
    ensure!(
        left.is_empty(),
        "pods left after RemovePodSandbox: {left:?}"
    );
    let left = cri::call(
        rt,
        "ListContainers after RemovePodSandbox",
        CALL_LIMIT,
        runtime.list_containers(api::ListContainersRequest { filter: None }),
    )?
    .containers;
    ensure!(
        left.is_empty(),
        "containers left after RemovePodSandbox: {left:?}"
    );
    Ok(())
}

/// One shim process for the pod, one QEMU, and the pod's eth0 redirected to the VM's TAP in
/// the pod's namespace.
fn check_one_vm(containerd: &Containerd, pod_id: &str, netns: &Path) -> Result<()> {
    let shims = containerd.shim_processes();
    ensure!(
        shims.len() == 1,
        "not one shim process for the pod: {shims:?}"
    );
    let vmms: Vec<_> = vmm_processes(pod_id)
        .into_iter()
        .filter(|(_, argv)| argv.starts_with("qemu-system"))
        .collect();
    ensure!(vmms.len() == 1, "not one QEMU for the pod: {vmms:?}");
    let in_pod = |args: &[&str]| -> Result<String> {
        let mut argv = vec![format!("--net={}", netns.display()), "--".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run("nsenter", &argv)
    };
    let taps = in_pod(&["ip", "-o", "link", "show", "type", "tun"])?;
    ensure!(
        taps.lines().count() == 1,
        "not one TAP in the pod's namespace: {taps}"
    );
    let filters = in_pod(&["tc", "filter", "show", "dev", "eth0", "ingress"])?;
    ensure!(
        filters.contains("mirred"),
        "the pod's eth0 is not redirected to the VM: {filters}"
    );
    Ok(())
}

/// containerd's CRI plugin sets the pod's network namespace in the sandbox's runtime spec;
/// the verbose PodSandboxStatus shows it.
fn sandbox_netns(info: &std::collections::HashMap<String, String>) -> Result<PathBuf> {
    let info: serde_json::Value =
        serde_json::from_str(info.get("info").context("no verbose info")?)?;
    let namespaces = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .context("no namespaces in the sandbox's spec")?;
    let path = namespaces
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .context("no network namespace path in the sandbox's spec")?;
    Ok(PathBuf::from(path))
}

/// Waits until the CRI plugin reports its network ready (it has loaded the CNI
/// configuration), at most 10 s.
fn wait_network_ready(rt: &tokio::runtime::Runtime, client: &Cri) -> Result<()> {
    let mut runtime = client.runtime.clone();
    let began = Instant::now();
    loop {
        let status = cri::call(
            rt,
            "Status",
            CALL_LIMIT,
            runtime.status(api::StatusRequest { verbose: false }),
        )?
        .status
        .context("CRI Status has no status")?;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.r#type == "NetworkReady")
            .context("no NetworkReady condition")?;
        if ready.status {
            return Ok(());
        }
        if began.elapsed() > Duration::from_secs(10) {
            bail!("the CRI network is not ready: {ready:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pings `ip` from the node namespace until it answers, at most `limit`.
fn wait_ping(node: &netdev::NetNs, ip: &str, limit: Duration) -> Result<()> {
    let began = Instant::now();
    loop {
        let ok = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                node.name(),
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                ip,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if began.elapsed() > limit {
            bail!("the pod at {ip} did not answer ping from the node within {limit:?}");
        }
    }
}

/// QEMU and virtiofsd processes whose command line names `id`: `(pid, command line)`.
fn vmm_processes(id: &str) -> Vec<(u32, String)> {
    workspace_tests::containerd::processes()
        .into_iter()
        .filter_map(|(pid, argv)| {
            let first = argv.first()?;
            let name = first.rsplit('/').next().unwrap_or(first).to_string();
            let line = argv.join(" ");
            ((name.starts_with("qemu-system") || name.ends_with("virtiofsd")) && line.contains(id))
                .then(|| (pid, format!("{name} {line}")))
        })
        .collect()
}

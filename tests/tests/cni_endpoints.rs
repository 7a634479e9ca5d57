//! Pod networks from the real CNI plugins, connected to QEMU guests through `endpoint`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guest_agent::protocol::{ExecRequest, InterfaceConfig, RouteConfig};
use hypervisor::DeviceConfig;
use workspace_tests::cni::{tc_state, CniNetwork, CniResult};
use workspace_tests::qemu::Qemu;
use workspace_tests::{unique_name, Backend, GuestAssets, Sandbox};

/// A pod: its namespace prepared by CNI, a sandbox on it, its endpoints attached.
struct Pod {
    sb: Sandbox,
    ns: endpoint::NetnsHandle,
    endpoints: Vec<endpoint::Endpoint>,
    cni: CniResult,
    container: String,
    tc_before: String,
}

async fn pod_on(net: &CniNetwork) -> Result<Pod> {
    let id = unique_name("pod");
    let ns = netdev::NetNs::create(&id)?;
    let cni = net.add(&id, ns.path())?;
    let tc_before = tc_state(ns.name(), "eth0")?;
    let assets = GuestAssets::find();
    let mut sb = Sandbox::prepare_in(&Qemu::Q35, Qemu::Q35.config(&assets), id.clone(), ns).await?;
    let handle = endpoint::NetnsHandle::connect(sb.ns().path()).await?;
    let endpoints = endpoint::attach_all(&handle, &endpoint::AttachOptions::default()).await?;
    ensure!(endpoints.len() == 1, "expected one endpoint: {endpoints:?}");
    for ep in &endpoints {
        sb.devices
            .add(DeviceConfig::Network(ep.network.clone()))
            .await?;
    }
    sb.start().await?;
    for ep in &endpoints {
        sb.agent()
            .configure_interface(
                InterfaceConfig {
                    mac: ep.guest.mac.to_string(),
                    set_mac: None,
                    addresses: ep.guest.addresses.clone(),
                    mtu: Some(ep.guest.mtu),
                    routes: ep
                        .guest
                        .routes
                        .iter()
                        .map(|r| RouteConfig {
                            dest: r.dest.to_string(),
                            gateway: r.gateway.map(|g| g.to_string()),
                        })
                        .collect(),
                },
                Duration::from_secs(20),
            )
            .await
            .context("configuring the guest NIC")?;
    }
    Ok(Pod {
        sb,
        ns: handle,
        endpoints,
        cni,
        container: id,
        tc_before,
    })
}

impl Pod {
    async fn guest_ping(&mut self, addr: &str) -> Result<bool> {
        let out = self
            .sb
            .agent()
            .exec(
                ExecRequest {
                    argv: vec![
                        "ping".into(),
                        "-c".into(),
                        "1".into(),
                        "-W".into(),
                        "2".into(),
                        addr.into(),
                    ],
                    timeout_ms: Some(10_000),
                },
                Duration::from_secs(20),
            )
            .await?;
        Ok(out.exit_code == Some(0))
    }

    /// Stops the VM, detaches, checks the namespace's tc state is back to CNI's, runs CNI
    /// `DEL`, and removes the namespace.
    async fn teardown(self, net: &CniNetwork) -> Result<()> {
        let Pod {
            sb,
            ns,
            endpoints,
            container,
            tc_before,
            ..
        } = self;
        sb.hv.stop().await?;
        for ep in endpoints {
            ep.detach(&ns).await.context("detach")?;
        }
        let name = sb.ns().name().to_string();
        let path = sb.ns().path().to_path_buf();
        let tc_after = tc_state(&name, "eth0")?;
        ensure!(
            tc_after == tc_before,
            "tc state differs after detach:\nbefore: {tc_before}\nafter: {tc_after}"
        );
        ensure!(sb.taps()?.is_empty(), "TAPs left: {:?}", sb.taps()?);
        net.del(&container, &path).context("CNI DEL")?;
        let pid = None;
        sb.teardown(pid).await
    }
}

async fn ping_from_node(net: &CniNetwork, addr: &str) -> bool {
    for _ in 0..30 {
        let ok = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                net.node.name(),
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
            .unwrap_or(false);
        if ok {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_plugin_pod_reaches_its_gateway_and_answers_the_node() {
    let net = CniNetwork::bridge("10.88.0.0/24").unwrap();
    let mut pod = pod_on(&net).await.unwrap();
    let ip = pod.cni.ip().to_string();
    assert!(
        ping_from_node(&net, &ip).await,
        "the guest at {ip} did not answer the node"
    );
    let gw = pod.cni.gateway.clone().expect("bridge sets a gateway");
    assert!(
        pod.guest_ping(&gw).await.unwrap(),
        "the guest cannot reach its gateway {gw}"
    );
    // The guest holds the address: the pod namespace's own stack never sees the traffic.
    let ifaces = pod
        .sb
        .agent()
        .list_interfaces(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i.addresses.contains(&pod.cni.address)),
        "no guest NIC has {}: {ifaces:?}",
        pod.cni.address
    );
    pod.teardown(&net).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptp_plugin_pod_answers_the_node() {
    let net = CniNetwork::ptp("10.89.0.0/24").unwrap();
    let mut pod = pod_on(&net).await.unwrap();
    let ip = pod.cni.ip().to_string();
    assert!(
        ping_from_node(&net, &ip).await,
        "the guest at {ip} did not answer the node"
    );
    let gw = pod.cni.gateway.clone().expect("ptp sets a gateway");
    assert!(
        pod.guest_ping(&gw).await.unwrap(),
        "the guest cannot reach {gw}"
    );
    pod.teardown(&net).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_on_one_bridge_reach_each_other() {
    let net = CniNetwork::bridge("10.90.0.0/24").unwrap();
    let mut a = pod_on(&net).await.unwrap();
    let b = pod_on(&net).await.unwrap();
    let b_ip = b.cni.ip().to_string();
    let mut reached = false;
    for _ in 0..10 {
        if a.guest_ping(&b_ip).await.unwrap() {
            reached = true;
            break;
        }
    }
    assert!(reached, "guest A could not reach guest B at {b_ip}");
    a.teardown(&net).await.unwrap();
    b.teardown(&net).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_is_named_in_the_error() {
    let err = endpoint::NetnsHandle::connect(std::path::Path::new("/run/netns/no-such-pod"))
        .await
        .unwrap_err();
    assert!(matches!(err, endpoint::Error::NetnsNotFound(_)), "{err}");
    assert!(err.to_string().contains("/run/netns/no-such-pod"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_namespace_is_refused_and_left_untouched() {
    workspace_tests::require_root();
    let ns = netdev::NetNs::create(&unique_name("empty")).unwrap();
    let before = tc_state(ns.name(), "lo").unwrap();
    let h = endpoint::NetnsHandle::connect(ns.path()).await.unwrap();
    let err = endpoint::attach_all(&h, &endpoint::AttachOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, endpoint::Error::NoInterfaces(_)), "{err}");
    assert_eq!(tc_state(ns.name(), "lo").unwrap(), before);
    let links = workspace_tests::run("ip", &["-n", ns.name(), "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo should exist: {links}");
    ns.delete().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_interface_is_reported_and_nothing_is_attached() {
    // A bridge: a kind no redirect can stand in for.
    workspace_tests::require_root();
    let ns = netdev::NetNs::create(&unique_name("brns")).unwrap();
    workspace_tests::run(
        "ip",
        &["-n", ns.name(), "link", "add", "d0", "type", "bridge"],
    )
    .unwrap();
    let before = tc_state(ns.name(), "d0").unwrap();
    let h = endpoint::NetnsHandle::connect(ns.path()).await.unwrap();
    let err = endpoint::attach_all(&h, &endpoint::AttachOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, endpoint::Error::Unsupported { ref name, .. } if name == "d0"),
        "{err}"
    );
    assert_eq!(tc_state(ns.name(), "d0").unwrap(), before);
    let taps = workspace_tests::run(
        "ip",
        &["-n", ns.name(), "-o", "link", "show", "type", "tun"],
    )
    .unwrap();
    assert!(taps.trim().is_empty(), "a TAP was left: {taps}");
    ns.delete().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interface_that_vanishes_between_scan_and_attach_is_named_and_nothing_is_left() {
    workspace_tests::require_root();
    let ns = netdev::NetNs::create(&unique_name("vanish")).unwrap();
    workspace_tests::run(
        "ip",
        &[
            "-n",
            ns.name(),
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
        ],
    )
    .unwrap();
    let h = endpoint::NetnsHandle::connect(ns.path()).await.unwrap();
    let snapshot = endpoint::scan(&h).await.unwrap();
    // Attach takes interfaces in ifindex order: the first veth end is the one attached
    // first, so the one whose disappearance attach meets.
    let first = snapshot
        .interfaces
        .iter()
        .find(|i| i.kind == endpoint::InterfaceKind::Veth)
        .unwrap_or_else(|| panic!("no veth in {snapshot:?}"))
        .name
        .clone();
    let before = tc_state(ns.name(), "lo").unwrap();
    // Gone between the scan and the attach, as when CNI DEL races a sandbox start. (Deleting
    // one end of a veth deletes both.)
    workspace_tests::run("ip", &["-n", ns.name(), "link", "del", &first]).unwrap();

    let err = endpoint::attach(&h, &snapshot, &endpoint::AttachOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, endpoint::Error::Vanished(ref name) if *name == first),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("{first} disappeared")),
        "{err}"
    );
    assert_eq!(tc_state(ns.name(), "lo").unwrap(), before);
    // The TAP made for it goes when its fd closes (after an RCU grace period).
    let mut links = String::new();
    for _ in 0..100 {
        links = workspace_tests::run("ip", &["-n", ns.name(), "-o", "link"]).unwrap();
        if links.lines().count() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(links.lines().count(), 1, "only lo should be left: {links}");
    ns.delete().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_handed_over_by_name_is_persistent_and_detach_deletes_it() {
    workspace_tests::require_root();
    let ns = netdev::NetNs::create(&unique_name("byname")).unwrap();
    let peer = netdev::NetNs::create(&unique_name("bypeer")).unwrap();
    workspace_tests::run(
        "ip",
        &[
            "-n",
            ns.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "netns",
            peer.name(),
        ],
    )
    .unwrap();
    let before = tc_state(ns.name(), "eth0").unwrap();
    let h = endpoint::NetnsHandle::connect(ns.path()).await.unwrap();
    let opts = endpoint::AttachOptions {
        queues: 1,
        handoff: endpoint::TapHandoff::Name,
    };
    let mut eps = endpoint::attach_all(&h, &opts).await.unwrap();
    assert_eq!(eps.len(), 1);
    let ep = eps.pop().unwrap();
    assert!(
        matches!(&ep.network.backend, hypervisor::device::NetworkBackend::TapName(n) if *n == ep.tap_name),
        "{:?}",
        ep.network.backend
    );
    // Persistent: it outlives the fds attach closed, for the VMM to open by name.
    let link = workspace_tests::run(
        "ip",
        &[
            "-n",
            ns.name(),
            "-d",
            "-j",
            "link",
            "show",
            "dev",
            &ep.tap_name,
        ],
    )
    .unwrap();
    let link: serde_json::Value = serde_json::from_str(&link).unwrap();
    assert_eq!(link[0]["linkinfo"]["info_data"]["persist"], true, "{link}");
    let filters = workspace_tests::run(
        "tc",
        &["-n", ns.name(), "filter", "show", "dev", "eth0", "ingress"],
    )
    .unwrap();
    assert!(filters.contains("mirred"), "{filters}");

    ep.detach(&h).await.unwrap();
    assert_eq!(tc_state(ns.name(), "eth0").unwrap(), before);
    let links = workspace_tests::run("ip", &["-n", ns.name(), "-o", "link"]).unwrap();
    assert_eq!(
        links.lines().count(),
        2,
        "only lo and eth0 should be left: {links}"
    );
    ns.delete().unwrap();
    peer.delete().unwrap();
}

//! `sandbox run --netns` on a pod network made by the real CNI plugins: the `bridge` plugin
//! with `host-local` IPAM, run inside a node namespace of the test (as containerd would run
//! it), gives the pod namespace a veth; the shim connects it to the guest through the
//! `endpoint` crate, the guest answers on the address CNI assigned and routes through the
//! gateway, and after SIGTERM the pod namespace is back to what CNI left, so CNI `DEL`
//! succeeds. Needs root, the CNI plugins (`make deps`) and the guest assets.
#![cfg(feature = "qemu")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use workspace_tests::cni::{tc_state, CniNetwork};
use workspace_tests::{require_root, run, unique_name};

mod common;

use common::{config, guest_dir, template_config, SHIM};

const READY_LIMIT: Duration = Duration::from_secs(240);
const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// The shim, stopped if the test fails before it exits: SIGTERM so that it stops its VMM
/// and removes what it created, SIGKILL if it does not exit in time.
struct Shim(Child);

impl Drop for Shim {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let began = Instant::now();
        while began.elapsed() < EXIT_LIMIT {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ping_from(netns: &str, extra: &[&str], ip: &str) -> bool {
    (0..30).any(|_| {
        Command::new("ip")
            .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1"])
            .args(extra)
            .arg(ip)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `ip -j addr show dev IF` in `netns`: (MAC, addresses with prefix).
fn link_facts(netns: &str, ifname: &str) -> (String, Vec<String>) {
    let out = run("ip", &["-n", netns, "-j", "addr", "show", "dev", ifname]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mac = v[0]["address"].as_str().unwrap().to_string();
    let addrs = v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    (mac, addrs)
}

#[test]
fn sandbox_run_on_a_cni_bridge_pod_answers_on_the_cni_address_and_leaves_cni_state_intact() {
    on_a_cni_bridge_pod(false);
}

/// The same from a VM template: the clone's NIC is the template's, bound to the pod's TAP,
/// and the guest must take the pod interface's MAC for the bridge's frames to reach it.
#[test]
fn a_clone_of_a_template_on_a_cni_bridge_pod_takes_the_pod_mac_and_answers() {
    on_a_cni_bridge_pod(true);
}

fn on_a_cni_bridge_pod(from_template: bool) {
    require_root();
    let guest = guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let config = if from_template {
        template_config(dir.path(), &guest)
    } else {
        config("configuration-qemu.toml")
    };
    let net = CniNetwork::bridge("10.93.0.0/24").unwrap();
    let node = net.node.name().to_string();
    let pod = netdev::NetNs::create(&unique_name("pod")).unwrap();
    let container = pod.name().to_string();
    let cni = net.add(&container, pod.path()).unwrap();
    let gateway = cni
        .gateway
        .clone()
        .expect("the bridge plugin sets a gateway");
    let tc_before = tc_state(pod.name(), "eth0").unwrap();
    let eth0_before = link_facts(pod.name(), "eth0");
    assert_eq!(eth0_before.1, std::slice::from_ref(&cni.address));

    let run_root = tempfile::tempdir().unwrap();
    let id = unique_name("cnisb");
    let mut child = Command::new(SHIM)
        .args(["sandbox", "run", "--json", "--config"])
        .arg(&config)
        .args(["--id", &id, "--netns"])
        .arg(pod.path())
        .arg("--run-root")
        .arg(run_root.path())
        .env("GUEST_DIR", &guest)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut shim = Shim(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(READY_LIMIT)
        .unwrap_or_else(|_| panic!("the sandbox was not ready within {READY_LIMIT:?}"));
    let facts: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the shim printed no facts ({e}): {line:?}"));

    // One NIC, the pod's: its MAC, CNI's address, the default route through the gateway.
    let nics = facts["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 1, "{facts}");
    let nic = &nics[0];
    assert_eq!(nic["pod_interface"], "eth0", "{nic}");
    assert_eq!(nic["mac"], eth0_before.0.as_str(), "{nic}");
    assert_eq!(nic["guest_ip"], cni.ip(), "{nic}");
    assert!(nic["host_address"].is_null(), "{nic}");
    let default = format!("default via {gateway}");
    assert!(
        nic["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == default.as_str()),
        "no {default:?} in {nic}"
    );
    assert_eq!(facts["netns_owned"], false);
    if from_template {
        assert!(
            facts["timings_ms"]["template"].is_u64(),
            "not a clone: {facts}"
        );
        assert_eq!(nic["hotplugged"], false, "not the template's NIC: {nic}");
        let name = nic["guest_interface"].as_str().unwrap();
        let seen = common::guest(
            run_root.path(),
            &id,
            &["cat", &format!("/sys/class/net/{name}/address")],
        );
        assert_eq!(seen.trim(), eth0_before.0, "the guest NIC's MAC");
    }
    let tap = nic["tap"].as_str().unwrap().to_string();
    let filters = run(
        "tc",
        &["-n", pod.name(), "filter", "show", "dev", "eth0", "ingress"],
    )
    .unwrap();
    assert!(
        filters.contains("mirred") && filters.contains(&tap),
        "no redirect from eth0 to {tap}: {filters}"
    );

    // The node reaches the guest on the address CNI assigned...
    assert!(
        ping_from(&node, &[], cni.ip()),
        "the guest did not answer the node at {}",
        cni.ip()
    );
    // ...and the guest answers an address off its subnet through its default route: the
    // node sends from an address on its loopback, so the reply must go via the gateway.
    run("ip", &["-n", &node, "link", "set", "lo", "up"]).unwrap();
    run(
        "ip",
        &["-n", &node, "addr", "add", "192.0.2.1/32", "dev", "lo"],
    )
    .unwrap();
    assert!(
        ping_from(&node, &["-I", "192.0.2.1"], cni.ip()),
        "the guest did not answer 192.0.2.1: no default route via {gateway}?"
    );

    let pid = shim.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let began = Instant::now();
    let status = loop {
        if let Some(s) = shim.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            began.elapsed() < EXIT_LIMIT,
            "the shim did not exit within {EXIT_LIMIT:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the shim exited with {status}");

    // What CNI made is as CNI left it; what the shim added is gone.
    assert_eq!(tc_state(pod.name(), "eth0").unwrap(), tc_before);
    assert_eq!(link_facts(pod.name(), "eth0"), eth0_before);
    let taps = run(
        "ip",
        &["-n", pod.name(), "-o", "link", "show", "type", "tun"],
    )
    .unwrap();
    assert!(taps.trim().is_empty(), "TAPs left in the pod: {taps}");
    assert!(!run_root.path().join("sandboxes").join(&id).exists());
    assert!(!run_root.path().join("vm").join(&id).exists());
    net.del(&container, pod.path())
        .expect("CNI DEL after the sandbox");
    let links = run("ip", &["-n", pod.name(), "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo should be left: {links}");
    pod.delete().unwrap();
}

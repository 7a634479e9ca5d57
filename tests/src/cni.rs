//! Pod networks made by the real CNI plugins (Debian's `containernetworking-plugins`), run the
//! way containerd runs them, inside a "node" namespace of the test so that the bridge and the
//! gateway address never touch the root namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

use crate::unique_name;

/// Where Debian installs the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// A node namespace with a CNI network configuration.
#[derive(Debug)]
pub struct CniNetwork {
    /// The node namespace (bridges live here).
    pub node: netdev::NetNs,
    /// Plugin configuration (JSON).
    pub config: serde_json::Value,
    data_dir: tempfile::TempDir,
}

/// What `ADD` returned for one pod.
#[derive(Debug, Clone)]
pub struct CniResult {
    /// The pod's address with prefix, such as `10.88.0.2/24`.
    pub address: String,
    /// The gateway, when the plugin set one.
    pub gateway: Option<String>,
}

impl CniResult {
    /// The address without its prefix.
    pub fn ip(&self) -> &str {
        self.address.split('/').next().unwrap_or_default()
    }
}

impl CniNetwork {
    /// A `bridge` network with `host-local` IPAM on `subnet`, gateway on the bridge.
    pub fn bridge(subnet: &str) -> Result<CniNetwork> {
        let data_dir = tempfile::tempdir()?;
        let config = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "testnet",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": subnet,
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": data_dir.path(),
            }
        });
        Self::new(config, data_dir)
    }

    /// A `ptp` network (a veth pair per pod, host end in the node namespace).
    pub fn ptp(subnet: &str) -> Result<CniNetwork> {
        let data_dir = tempfile::tempdir()?;
        let config = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "testptp",
            "type": "ptp",
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": subnet,
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": data_dir.path(),
            }
        });
        Self::new(config, data_dir)
    }

    fn new(config: serde_json::Value, data_dir: tempfile::TempDir) -> Result<CniNetwork> {
        crate::require_root();
        let plugin = Path::new(CNI_PATH).join(config["type"].as_str().unwrap_or_default());
        ensure!(
            plugin.exists(),
            "{} is missing: run `make deps` (Debian package containernetworking-plugins)",
            plugin.display()
        );
        let node = netdev::NetNs::create(&unique_name("node"))?;
        Ok(CniNetwork {
            node,
            config,
            data_dir,
        })
    }

    /// Runs the plugin with `command` for the pod in `pod_netns`, like containerd does.
    fn invoke(&self, command: &str, container: &str, pod_netns: &Path) -> Result<String> {
        let plugin = Path::new(CNI_PATH).join(self.config["type"].as_str().unwrap_or_default());
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.node.name()])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", pod_netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the CNI plugin")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(self.config.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "CNI {command} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CNI `ADD`: gives the pod namespace its interface.
    pub fn add(&self, container: &str, pod_netns: &Path) -> Result<CniResult> {
        let out = self.invoke("ADD", container, pod_netns)?;
        let v: serde_json::Value = serde_json::from_str(&out).context("CNI result")?;
        let ip = &v["ips"][0];
        Ok(CniResult {
            address: ip["address"]
                .as_str()
                .context("no address in CNI result")?
                .into(),
            gateway: ip["gateway"].as_str().map(String::from),
        })
    }

    /// CNI `DEL`.
    pub fn del(&self, container: &str, pod_netns: &Path) -> Result<()> {
        self.invoke("DEL", container, pod_netns).map(drop)
    }

    /// The IPAM data directory (unique per network).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.path().to_path_buf()
    }
}

/// `tc -j qdisc show` and `tc -j filter show dev IF ingress` of a namespace, for comparing
/// before and after. Fails when either command fails (a missing interface, say): an empty
/// state would compare equal to another empty state and hide it. Without an ingress qdisc,
/// `tc` lists no filter and succeeds.
pub fn tc_state(netns: &str, ifname: &str) -> Result<String> {
    let q = crate::run("tc", &["-n", netns, "-j", "qdisc", "show"])
        .with_context(|| format!("listing the qdiscs of namespace {netns}"))?;
    let f = crate::run(
        "tc",
        &[
            "-n", netns, "-j", "filter", "show", "dev", ifname, "ingress",
        ],
    )
    .with_context(|| format!("listing the ingress filters of {ifname} in namespace {netns}"))?;
    Ok(format!("{q}\n{f}"))
}

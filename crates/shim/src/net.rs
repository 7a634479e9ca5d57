//! Host side of a sandbox's NICs: TAPs from `netdev`, one free /24 per NIC, the host's
//! address on the TAP and the namespace's addresses and TAPs read and set over route netlink
//! ([`endpoint::address`]), inside the sandbox's namespace.
//!
//! Nothing here blocks an async worker: `netdev` calls that enter a namespace (they start
//! and join a thread) run on the blocking pool ([`blocking`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use endpoint::NetnsHandle;
use guest_agent::protocol::RouteConfig;
use hypervisor::device::{NetworkBackend, NetworkConfig};
use hypervisor::MacAddress;

/// A /24 that one NIC uses: the host is `.1` on the TAP, the guest `.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet24(pub [u8; 3]);

impl Subnet24 {
    /// Parses `A.B.C.0/24` (or `A.B.C.D/24`, or `A.B.C.D`).
    pub fn parse(text: &str) -> Result<Subnet24> {
        let (addr, prefix) = text.split_once('/').unwrap_or((text, "24"));
        ensure!(
            prefix == "24",
            "--subnet {text}: only /24 subnets are supported (host .1, guest .2)"
        );
        let ip: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("--subnet {text}: {addr:?} is not an IPv4 address"))?;
        let o = ip.octets();
        Ok(Subnet24([o[0], o[1], o[2]]))
    }

    /// The `n`th /24 after this one (the third octet counts up), if it exists.
    pub fn nth(self, n: u8) -> Option<Subnet24> {
        let [a, b, c] = self.0;
        c.checked_add(n).map(|c| Subnet24([a, b, c]))
    }

    /// The address `.last` in it.
    pub fn host(self, last: u8) -> Ipv4Addr {
        let [a, b, c] = self.0;
        Ipv4Addr::new(a, b, c, last)
    }

    /// Whether it overlaps the network `addr/prefix`.
    pub fn overlaps(self, addr: Ipv4Addr, prefix: u8) -> bool {
        let prefix = u32::from(prefix.min(32)).min(24);
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        (u32::from(self.host(0)) & mask) == (u32::from(addr) & mask)
    }
}

/// Runs `f` on the blocking pool (it may join a thread, wait on a process or sleep in a
/// system call) and returns its result; a panic in `f` is resumed here.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(anyhow!("a blocking step was cancelled: {e}")),
    }
}

/// Route netlink inside `netns`.
pub async fn connect(netns: &Path) -> Result<NetnsHandle> {
    NetnsHandle::connect(netns)
        .await
        .with_context(|| format!("Opening route netlink in {}", netns.display()))
}

/// IPv4 networks in use in the namespace, as (address, prefix length).
pub async fn used_networks(ns: &NetnsHandle) -> Result<Vec<(Ipv4Addr, u8)>> {
    Ok(endpoint::address::ipv4_networks(ns).await?)
}

/// The first /24 from `base` upwards that overlaps nothing in `used` or `taken`.
pub fn free_subnet(
    base: Subnet24,
    used: &[(Ipv4Addr, u8)],
    taken: &[Subnet24],
) -> Result<Subnet24> {
    for n in 0..=u8::MAX {
        let Some(s) = base.nth(n) else { break };
        if taken.contains(&s) || used.iter().any(|(a, p)| s.overlaps(*a, *p)) {
            continue;
        }
        return Ok(s);
    }
    bail!(
        "no free /24 from {}.0/24 upwards in the namespace; pass another --subnet",
        base.host(0)
    )
}

/// A TAP created for the guest, its addressing, and the device config handing its fds over.
#[derive(Debug)]
pub struct HostNic {
    /// Interface name the kernel gave the TAP.
    pub tap: String,
    /// Its /24.
    pub subnet: Subnet24,
    /// The guest NIC's MAC.
    pub mac: MacAddress,
    /// The device config. With [`TapHandoff::Fds`] it holds the only copies of the TAP fds:
    /// once the VMM holds its own, the TAP lives as long as the VMM.
    pub config: NetworkConfig,
}

/// How the backend takes its TAP: open queue fds (QEMU; the TAP goes away when the last fd
/// closes) or by name (Dragonball opens it in the namespace itself; the TAP is persistent,
/// the shim keeps no fd and deletes it at the end).
pub use endpoint::TapHandoff;

/// What one guest NIC gets, whatever made its TAP.
#[derive(Debug, Clone)]
pub struct NicPlan {
    /// The host TAP.
    pub tap: String,
    /// The guest NIC's MAC.
    pub mac: MacAddress,
    /// Guest addresses with prefix; the first IPv4 one is the one to ping.
    pub addresses: Vec<String>,
    /// Guest MTU, when it must match a pod interface.
    pub mtu: Option<u32>,
    /// Routes through this NIC.
    pub routes: Vec<RouteConfig>,
    /// The host's address on the TAP, when the host routes to the guest itself.
    pub host_address: Option<String>,
    /// The pod interface the TAP is redirected to.
    pub pod_interface: Option<String>,
    /// The MAC the guest NIC has until it is configured, when not `mac`: a VM restored from
    /// a template has the template's NIC (see [`crate::template`]).
    pub template_mac: Option<MacAddress>,
}

impl NicPlan {
    /// The address to ping: the first IPv4 one, else the first, without prefix.
    pub fn guest_ip(&self) -> String {
        let bare = |a: &String| a.split('/').next().unwrap_or_default().to_string();
        self.addresses
            .iter()
            .find(|a| bare(a).parse::<Ipv4Addr>().is_ok())
            .or(self.addresses.first())
            .map(bare)
            .unwrap_or_default()
    }

    /// Routes as people read them: `default via 10.88.0.1`, `10.1.0.0/16`.
    pub fn routes_human(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|r| match &r.gateway {
                Some(g) => format!("{} via {g}", r.dest),
                None => r.dest.clone(),
            })
            .collect()
    }
}

impl HostNic {
    /// The guest gets `.2/24`; the host has `.1/24` on the TAP.
    pub fn plan(&self) -> NicPlan {
        NicPlan {
            tap: self.tap.clone(),
            mac: self.mac,
            addresses: vec![format!("{}/24", self.subnet.host(2))],
            mtu: None,
            routes: Vec::new(),
            host_address: Some(format!("{}/24", self.subnet.host(1))),
            pod_interface: None,
            template_mac: None,
        }
    }
}

/// A persistent TAP its creator has not recorded yet: deleted when dropped, so that a
/// creation cancelled half-way (its future dropped) leaves no TAP that no record names.
struct Unrecorded {
    name: String,
    netns: PathBuf,
    armed: bool,
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (name, netns) = (self.name.clone(), self.netns.clone());
        let delete = move || {
            let _ = netdev::delete_tap(&name, Some(&netns));
        };
        // Off the async workers when there are any; a runtime waits for its blocking
        // tasks before it shuts down.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(delete)),
            Err(_) => delete(),
        }
    }
}

/// Creates a TAP (`tap%d`) with `queues` queue pairs in the namespace of `ns`, up, with
/// `.1/24` of `subnet` on it, handed over as `handoff` says.
///
/// A persistent TAP ([`TapHandoff::Name`]) is deleted again when this fails or is
/// cancelled; the caller records it as soon as this returns.
pub async fn create_tap(
    ns: &NetnsHandle,
    subnet: Subnet24,
    queues: u16,
    mac: MacAddress,
    handoff: TapHandoff,
) -> Result<HostNic> {
    let netns = ns.netns.clone();
    let persistent = handoff == TapHandoff::Name;
    let builder = netdev::TapBuilder::new("tap%d")
        .queues(usize::from(queues))
        .multi_queue(queues > 1)
        .persist(persistent)
        .netns(&netns)
        .up(true);
    let (tap, mut guard) = blocking(move || {
        builder.create().map(|tap| {
            let guard = Unrecorded {
                name: tap.name().to_string(),
                netns,
                armed: persistent,
            };
            (tap, guard)
        })
    })
    .await?
    .with_context(|| format!("Creating a TAP in {}", ns.netns.display()))?;
    let name = tap.name().to_string();
    let host = subnet.host(1);
    let added = endpoint::address::add_address(ns, tap.ifindex(), IpAddr::V4(host), 24).await;
    if let Err(e) = added {
        if guard.armed {
            guard.armed = false;
            drop(tap);
            let _ = delete_tap(&name, &ns.netns).await;
        }
        return Err(
            anyhow::Error::from(e).context(format!("Giving TAP {name} the address {host}/24"))
        );
    }
    guard.armed = false;
    let backend = match handoff {
        TapHandoff::Fds => NetworkBackend::TapFds {
            name: name.clone(),
            queues: tap.into_queues().into_iter().map(Arc::new).collect(),
        },
        // Our fds close here; the persistent device stays for the VMM to attach to.
        TapHandoff::Name => NetworkBackend::TapName(name.clone()),
    };
    Ok(HostNic {
        subnet,
        mac,
        config: NetworkConfig {
            backend,
            guest_mac: mac,
            queue_pairs: queues,
            queue_size: None,
            mtu: None,
        },
        tap: name,
    })
}

/// A NIC on a TAP that carries nothing: down, without an address, not persistent (it goes
/// when its last fd closes: the VMM's), in `netns`. A VM template's source boots with one
/// ([`crate::template`]).
pub async fn spare_nic(netns: &Path, queues: u16, mac: MacAddress) -> Result<NetworkConfig> {
    let builder = netdev::TapBuilder::new("tap%d")
        .queues(usize::from(queues))
        .multi_queue(queues > 1)
        .persist(false)
        .netns(netns)
        .up(false);
    let tap = blocking(move || builder.create())
        .await?
        .with_context(|| format!("Creating a spare TAP in {}", netns.display()))?;
    Ok(NetworkConfig {
        backend: NetworkBackend::TapFds {
            name: tap.name().to_string(),
            queues: tap.into_queues().into_iter().map(Arc::new).collect(),
        },
        guest_mac: mac,
        queue_pairs: queues,
        queue_size: None,
        mtu: None,
    })
}

/// Names of the TUN/TAP devices in the namespace of `ns`.
pub async fn taps_in(ns: &NetnsHandle) -> Result<Vec<String>> {
    Ok(endpoint::address::tun_devices(ns).await?)
}

/// Deletes the TAP `name` in `netns` (a persistent one, or one left behind).
pub async fn delete_tap(name: &str, netns: &Path) -> std::result::Result<(), netdev::Error> {
    let (name, netns) = (name.to_owned(), netns.to_path_buf());
    match tokio::task::spawn_blocking(move || netdev::delete_tap(&name, Some(&netns))).await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(netdev::Error::Io {
            step: "Deleting a TAP".to_owned(),
            source: std::io::Error::other(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_count_up() {
        let s = Subnet24::parse("10.200.0.0/24").unwrap();
        assert_eq!(s.host(2), Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(s.nth(3), Some(Subnet24([10, 200, 3])));
        assert_eq!(Subnet24([10, 200, 255]).nth(1), None);
        assert!(Subnet24::parse("10.200.0.0/16").is_err());
        assert!(Subnet24::parse("nope").is_err());
    }

    #[test]
    fn the_address_to_ping_is_the_first_ipv4_one() {
        let mut plan = NicPlan {
            tap: "tap0".into(),
            mac: MacAddress([2, 0, 0, 0, 0, 1]),
            addresses: vec!["fd00::5/64".into(), "10.88.0.5/24".into()],
            mtu: None,
            routes: vec![RouteConfig {
                dest: "default".into(),
                gateway: Some("10.88.0.1".into()),
            }],
            host_address: None,
            pod_interface: Some("eth0".into()),
            template_mac: None,
        };
        assert_eq!(plan.guest_ip(), "10.88.0.5");
        assert_eq!(plan.routes_human(), ["default via 10.88.0.1"]);
        plan.addresses.remove(1);
        assert_eq!(plan.guest_ip(), "fd00::5");
        plan.addresses.clear();
        assert_eq!(plan.guest_ip(), "");
    }

    #[test]
    fn a_used_network_is_skipped() {
        let base = Subnet24([10, 200, 0]);
        let used = [(Ipv4Addr::new(10, 200, 0, 7), 24)];
        assert_eq!(
            free_subnet(base, &used, &[]).unwrap(),
            Subnet24([10, 200, 1])
        );
        // A wider network covers several /24s.
        let wide = [(Ipv4Addr::new(10, 200, 0, 1), 22)];
        assert_eq!(
            free_subnet(base, &wide, &[]).unwrap(),
            Subnet24([10, 200, 4])
        );
        assert_eq!(
            free_subnet(base, &[], &[base]).unwrap(),
            Subnet24([10, 200, 1])
        );
    }

    /// The host side over route netlink, checked against what `ip` shows: the TAP is up
    /// with `.1/24`, the namespace's networks and TAPs list it, the next free /24 skips it,
    /// and the TAP goes with its fds.
    #[tokio::test]
    async fn a_tap_gets_its_host_address_and_is_listed_over_netlink() {
        let name = format!("shim-net-{}", std::process::id());
        let ns = netdev::NetNs::create(&name).expect("creating a namespace (needs root)");
        let handle = connect(ns.path()).await.unwrap();
        let base = Subnet24([10, 231, 0]);
        let mac = MacAddress::local_from_seed(b"a_tap_gets_its_host_address");
        let nic = create_tap(&handle, base, 1, mac, TapHandoff::Fds)
            .await
            .unwrap();
        let out = std::process::Command::new("ip")
            .args(["-n", &name, "-j", "-4", "addr", "show", "dev", &nic.tap])
            .output()
            .expect("running ip (iproute2)");
        assert!(out.status.success(), "{out:?}");
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(shown[0]["addr_info"][0]["local"], "10.231.0.1");
        assert_eq!(shown[0]["addr_info"][0]["prefixlen"], 24);
        assert!(shown[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP"));

        let used = used_networks(&handle).await.unwrap();
        assert!(
            used.contains(&(Ipv4Addr::new(10, 231, 0, 1), 24)),
            "{used:?}"
        );
        assert_eq!(
            free_subnet(base, &used, &[]).unwrap(),
            Subnet24([10, 231, 1])
        );
        assert_eq!(taps_in(&handle).await.unwrap(), vec![nic.tap.clone()]);

        drop(nic);
        // The TAP goes with its last fd, after an RCU grace period.
        let began = std::time::Instant::now();
        while !taps_in(&handle).await.unwrap().is_empty() {
            assert!(
                began.elapsed() < std::time::Duration::from_secs(5),
                "the TAP stayed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(handle);
        ns.delete().unwrap();
    }
}

//! Reading a namespace's interfaces, addresses and routes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use hypervisor::MacAddress;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType};
use rtnetlink::RouteMessageBuilder;

use crate::{Error, NetnsHandle, Result};

/// Main routing table id.
const MAIN_TABLE: u8 = 254;

/// An interface kind, from its link info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceKind {
    /// `lo`.
    Loopback,
    /// One end of a veth pair.
    Veth,
    /// macvlan.
    MacVlan,
    /// ipvlan.
    IpVlan,
    /// A TUN/TAP device (ours, or another runtime's).
    Tap,
    /// Anything else, by its kernel kind name.
    Other(String),
}

impl InterfaceKind {
    /// Whether a redirect to a TAP can carry this interface's traffic.
    pub fn is_connectable(&self) -> bool {
        matches!(
            self,
            InterfaceKind::Veth | InterfaceKind::MacVlan | InterfaceKind::IpVlan
        )
    }
}

impl fmt::Display for InterfaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceKind::Loopback => f.write_str("loopback"),
            InterfaceKind::Veth => f.write_str("veth"),
            InterfaceKind::MacVlan => f.write_str("macvlan"),
            InterfaceKind::IpVlan => f.write_str("ipvlan"),
            InterfaceKind::Tap => f.write_str("tun/tap"),
            InterfaceKind::Other(k) => write!(f, "{k} device"),
        }
    }
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An interface in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: InterfaceKind,
    /// MAC, for Ethernet-like devices.
    pub mac: Option<MacAddress>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// IPv4 and global IPv6 addresses.
    pub addresses: Vec<IpNet>,
}

/// A route of the main table that the guest needs (not the kernel's own subnet routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination; `None` for the default route.
    pub dest: Option<IpNet>,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
}

/// Where a route leads: everywhere else, or one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteDestination {
    /// The default route.
    Default,
    /// A network, in CIDR notation.
    Net(IpNet),
}

impl From<Option<IpNet>> for RouteDestination {
    fn from(dest: Option<IpNet>) -> Self {
        dest.map_or(RouteDestination::Default, RouteDestination::Net)
    }
}

impl fmt::Display for RouteDestination {
    /// `default`, or the network as `10.1.0.0/16`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteDestination::Default => f.write_str("default"),
            RouteDestination::Net(net) => net.fmt(f),
        }
    }
}

/// A route the guest installs on one of its NICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRoute {
    /// Destination.
    pub dest: RouteDestination,
    /// Next hop; without it the destination is on-link.
    pub gateway: Option<IpAddr>,
}

impl fmt::Display for GuestRoute {
    /// As `ip route` reads it: `default via 10.88.0.1`, `10.1.0.0/16`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(g) => write!(f, "{} via {g}", self.dest),
            None => self.dest.fmt(f),
        }
    }
}

impl From<&Route> for GuestRoute {
    fn from(r: &Route) -> Self {
        GuestRoute {
            dest: r.dest.into(),
            gateway: r.gateway,
        }
    }
}

/// What a namespace holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetnsSnapshot {
    /// Interfaces, in ifindex order.
    pub interfaces: Vec<Interface>,
    /// Routes the guest must install.
    pub routes: Vec<Route>,
}

fn netlink_err(step: &str) -> impl Fn(rtnetlink::Error) -> Error + '_ {
    move |source| Error::Netlink {
        step: step.to_string(),
        source,
    }
}

/// Reads interfaces, addresses and routes of the namespace.
pub async fn scan(ns: &NetnsHandle) -> Result<NetnsSnapshot> {
    let mut interfaces = Vec::new();
    let step = format!("Listing links in {}", ns.netns.display());
    let mut links = ns.handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink_err(&step))? {
        let mut iface = Interface {
            index: msg.header.index,
            name: String::new(),
            kind: InterfaceKind::Other("unknown".into()),
            mac: None,
            mtu: 1500,
            up: msg.header.flags.contains(LinkFlags::Up),
            addresses: Vec::new(),
        };
        let loopback = msg.header.flags.contains(LinkFlags::Loopback);
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => iface.name = n,
                LinkAttribute::Mtu(m) => iface.mtu = m,
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(&a);
                    iface.mac = Some(MacAddress(m));
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            iface.kind = kind_of(&k);
                        }
                    }
                }
                _ => {}
            }
        }
        if loopback {
            iface.kind = InterfaceKind::Loopback;
        }
        interfaces.push(iface);
    }

    let step = format!("Listing addresses in {}", ns.netns.display());
    let mut addrs = ns.handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(netlink_err(&step))? {
        let Some(iface) = interfaces.iter_mut().find(|i| i.index == msg.header.index) else {
            continue;
        };
        let prefix = msg.header.prefix_len;
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        match addr {
            Some(IpAddr::V6(v6)) if is_link_local(&v6) => {}
            Some(addr) => iface.addresses.push(IpNet { addr, prefix }),
            None => {}
        }
    }

    let mut routes = Vec::new();
    let step = format!("Listing routes in {}", ns.netns.display());
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut stream = ns.handle.route().get(query).execute();
        while let Some(msg) = stream.try_next().await.map_err(netlink_err(&step))? {
            let h = &msg.header;
            // The kernel's own subnet routes come back when the guest gets its addresses.
            if h.table != MAIN_TABLE
                || h.kind != RouteType::Unicast
                || h.protocol == RouteProtocol::Kernel
            {
                continue;
            }
            let mut route = Route {
                dest: None,
                gateway: None,
                oif: None,
            };
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(a) => {
                        route.dest = route_addr(a).map(|addr| IpNet {
                            addr,
                            prefix: h.destination_prefix_length,
                        })
                    }
                    RouteAttribute::Gateway(a) => route.gateway = route_addr(a),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    _ => {}
                }
            }
            if matches!(route.gateway, Some(IpAddr::V6(g)) if is_link_local(&g)) {
                continue;
            }
            routes.push(route);
        }
    }
    interfaces.sort_by_key(|i| i.index);
    Ok(NetnsSnapshot { interfaces, routes })
}

fn kind_of(k: &InfoKind) -> InterfaceKind {
    match k {
        InfoKind::Veth => InterfaceKind::Veth,
        InfoKind::MacVlan => InterfaceKind::MacVlan,
        InfoKind::IpVlan => InterfaceKind::IpVlan,
        InfoKind::Tun => InterfaceKind::Tap,
        other => InterfaceKind::Other(format!("{other:?}").to_lowercase()),
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn is_link_local(v6: &Ipv6Addr) -> bool {
    (v6.segments()[0] & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_routes_print_as_ip_route_reads_them() {
        let net = IpNet {
            addr: "10.1.0.0".parse().unwrap(),
            prefix: 16,
        };
        let default_via = GuestRoute {
            dest: None.into(),
            gateway: Some("10.88.0.1".parse().unwrap()),
        };
        let on_link = GuestRoute {
            dest: Some(net).into(),
            gateway: None,
        };
        assert_eq!(default_via.dest.to_string(), "default");
        assert_eq!(default_via.to_string(), "default via 10.88.0.1");
        assert_eq!(on_link.dest.to_string(), "10.1.0.0/16");
        assert_eq!(on_link.to_string(), "10.1.0.0/16");
    }
}

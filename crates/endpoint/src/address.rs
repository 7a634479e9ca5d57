//! Host-side addressing over route netlink: the IPv4 networks a namespace uses, an address
//! put on an interface, and the TUN/TAP devices a namespace holds.
//!
//! What a runtime that gives its TAP a host address needs (`ip -4 addr show`, `ip addr add`,
//! `ip link show type tun`) without running `ip`: every request goes through a
//! [`NetnsHandle`], whose socket was opened inside the namespace, so no thread of the
//! caller changes namespace.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};

use crate::NetnsHandle;

/// Errors of host-side addressing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A route netlink request failed.
    #[error("{step} in {}", netns.display())]
    Netlink {
        /// What was being done.
        step: String,
        /// The namespace.
        netns: PathBuf,
        /// The kernel's or the library's error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn failed<'a>(ns: &'a NetnsHandle, step: &'a str) -> impl Fn(rtnetlink::Error) -> Error + 'a {
    move |source| Error::Netlink {
        step: step.to_owned(),
        netns: ns.netns.clone(),
        source,
    }
}

/// The IPv4 addresses of every interface of the namespace (`lo` included), each with its
/// prefix length: the networks a new subnet must not overlap.
pub async fn ipv4_networks(ns: &NetnsHandle) -> Result<Vec<(Ipv4Addr, u8)>> {
    let step = "Listing IPv4 addresses";
    let mut used = Vec::new();
    let mut addrs = ns.handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(failed(ns, step))? {
        // The local address is the interface's own; on point-to-point links `Address` is
        // the peer's.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            used.push((ip, msg.header.prefix_len.min(32)));
        }
    }
    Ok(used)
}

/// Adds `addr/prefix` to the interface with index `ifindex`, as `ip addr add` does.
pub async fn add_address(ns: &NetnsHandle, ifindex: u32, addr: IpAddr, prefix: u8) -> Result<()> {
    let step = format!("Adding address {addr}/{prefix} to interface {ifindex}");
    ns.handle
        .address()
        .add(ifindex, addr, prefix)
        .execute()
        .await
        .map_err(failed(ns, &step))
}

/// Names of the TUN/TAP devices of the namespace, in the kernel's order.
pub async fn tun_devices(ns: &NetnsHandle) -> Result<Vec<String>> {
    let step = "Listing TUN/TAP devices";
    let mut names = Vec::new();
    let mut links = ns.handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(failed(ns, step))? {
        let mut name = None;
        let mut tun = false;
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::LinkInfo(infos) => {
                    tun |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun)));
                }
                _ => {}
            }
        }
        if let (true, Some(name)) = (tun, name) {
            names.push(name);
        }
    }
    Ok(names)
}

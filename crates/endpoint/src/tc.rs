//! Ingress qdiscs and `mirred` redirect filters over route netlink.

use std::time::Duration;

use futures_util::TryStreamExt;

use crate::{Error, NetnsHandle, Result};

/// `ETH_P_ALL` in network byte order, as tc filters expect their protocol.
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();
/// Filter priority of our redirects.
const PRIORITY: u16 = 49152;
/// Creating an ingress qdisc right after a device appears can fail with EBUSY while the
/// kernel is still setting the device up; a few short retries get past it.
const EBUSY_RETRIES: usize = 20;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Adds an ingress qdisc to `index`. An existing one is not ours to reuse.
pub(crate) async fn add_ingress(ns: &NetnsHandle, index: u32, name: &str) -> Result<()> {
    for attempt in 0.. {
        match ns
            .handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if errno(&e) == Some(libc::EBUSY) && attempt < EBUSY_RETRIES => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                return Err(Error::IngressBusy(name.to_string()))
            }
            Err(e) => {
                return Err(Error::Netlink {
                    step: format!("Adding an ingress qdisc to {name}"),
                    source: e,
                })
            }
        }
    }
    unreachable!("the loop returns")
}

/// Redirects every frame arriving on `from` out of `to`.
pub(crate) async fn redirect(ns: &NetnsHandle, from: u32, to: u32, name: &str) -> Result<()> {
    let step = || format!("Adding a redirect filter on {name}");
    ns.handle
        .traffic_filter(from as i32)
        .add()
        .ingress()
        .priority(PRIORITY)
        .protocol(ALL_PROTOCOLS)
        .redirect(to)
        .map_err(|source| Error::Netlink {
            step: step(),
            source,
        })?
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            step: step(),
            source,
        })
}

/// Deletes the ingress qdisc of `index`, and with it every filter attached to it.
pub(crate) async fn del_ingress(ns: &NetnsHandle, index: u32) -> Result<()> {
    del_ingress_request(ns, index)
        .execute()
        .await
        .map_err(|e| del_ingress_failed(index, e))
}

/// Deletes the ingress qdisc of `index` if it has one; `false` when there was none.
pub(crate) async fn del_ingress_if_any(ns: &NetnsHandle, index: u32) -> Result<bool> {
    match del_ingress_request(ns, index).execute().await {
        Ok(()) => Ok(true),
        // No qdisc: ENOENT or EINVAL, depending on the kernel; the device gone: ENODEV.
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {
            Ok(false)
        }
        Err(e) => Err(del_ingress_failed(index, e)),
    }
}

fn del_ingress_request(ns: &NetnsHandle, index: u32) -> rtnetlink::QDiscDelRequest {
    let mut req = ns.handle.clone().qdisc().del(index as i32);
    let msg = req.message_mut();
    msg.header.parent = netlink_packet_route::tc::TcHandle::INGRESS;
    msg.header.handle = netlink_packet_route::tc::TcHandle::from(0xffff_0000);
    req
}

fn del_ingress_failed(index: u32, e: rtnetlink::Error) -> Error {
    Error::Netlink {
        step: format!("Removing the ingress qdisc of interface {index}"),
        source: e,
    }
}

/// Whether `index` has an ingress (or clsact) qdisc already.
pub(crate) async fn has_ingress(ns: &NetnsHandle, index: u32) -> Result<bool> {
    let step = || format!("Listing the qdiscs of interface {index}");
    // A qdisc dump covers every device: keep the one asked about.
    let mut qdiscs = ns.handle.qdisc().get().index(index as i32).execute();
    while let Some(msg) = qdiscs.try_next().await.map_err(|source| Error::Netlink {
        step: step(),
        source,
    })? {
        if msg.header.index == index as i32
            && msg.header.parent == netlink_packet_route::tc::TcHandle::INGRESS
        {
            return Ok(true);
        }
    }
    Ok(false)
}

//! A pod network namespace that CNI prepared: its interfaces connected to TAPs by the
//! `endpoint` crate (ingress qdiscs and `mirred` redirects), and what the guest must
//! configure so that it holds the pod's addresses and routes.
//!
//! The shim owns only what `endpoint` added (TAPs, qdiscs, filters) and removes exactly that;
//! the interfaces and the namespace belong to CNI.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use endpoint::{AttachOptions, Endpoint, NetnsHandle};
use guest_agent::protocol::RouteConfig;
use slog::info;

use crate::net::NicPlan;
use crate::records::{EndpointRecord, Records};

/// The endpoints attached in a given namespace.
#[derive(Debug)]
pub struct PodNetwork {
    ns: NetnsHandle,
    /// One per CNI interface, in ifindex order.
    pub endpoints: Vec<Endpoint>,
}

/// Attaches every interface of `netns`; `None` when it holds none but `lo` (the shim then
/// makes its own TAP). Any other failure leaves nothing attached. What will be added is
/// recorded in `records` before it is added, and unrecorded when attaching fails.
pub async fn attach(
    log: &slog::Logger,
    netns: &Path,
    opts: &AttachOptions,
    records: &mut Records,
) -> Result<Option<PodNetwork>> {
    let began = Instant::now();
    let ns = NetnsHandle::connect(netns)
        .await
        .with_context(|| format!("Opening route netlink in {}", netns.display()))?;
    let failed = |e: endpoint::Error| {
        anyhow::Error::from(e).context(format!(
            "Connecting the interfaces of {} to TAPs",
            netns.display()
        ))
    };
    let snapshot = endpoint::scan(&ns).await.map_err(failed)?;
    let plans = match endpoint::plan(&ns, &snapshot, opts).await {
        Ok(plans) => plans,
        Err(endpoint::Error::NoInterfaces(_)) => {
            info!(log, "no pod interface in the namespace: the shim makes its own TAP";
                "netns" => netns.display().to_string());
            return Ok(None);
        }
        Err(e) => return Err(failed(e)),
    };
    records.update(|r| {
        r.endpoints
            .extend(plans.iter().map(|p| EndpointRecord::new(netns, p)))
    })?;
    let endpoints = match endpoint::attach(&ns, &snapshot, opts).await {
        Ok(eps) => eps,
        Err(e) => {
            // Attach undid its steps: nothing of the plan is left to record.
            records.update(|r| r.endpoints.clear())?;
            return Err(failed(e));
        }
    };
    for ep in &endpoints {
        info!(log, "pod interface connected"; "interface" => &ep.interface.name,
            "kind" => ep.interface.kind.to_string(), "tap" => &ep.tap_name,
            "mac" => ep.guest.mac.to_string(), "addresses" => ep.guest.addresses.join(" "),
            "routes" => ep.guest.routes.len());
    }
    info!(log, "pod network attached"; "endpoints" => endpoints.len(),
        "ms" => began.elapsed().as_millis() as u64);
    Ok(Some(PodNetwork { ns, endpoints }))
}

/// What the guest NIC of `ep` gets: the interface's MAC, addresses, MTU and routes.
pub fn plan(ep: &Endpoint) -> NicPlan {
    NicPlan {
        tap: ep.tap_name.clone(),
        mac: ep.guest.mac,
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
        host_address: None,
        pod_interface: Some(ep.interface.name.clone()),
        template_mac: None,
    }
}

impl PodNetwork {
    /// Detaches every endpoint (after the VMM let go of the TAPs); returns what failed.
    pub async fn detach(self, log: &slog::Logger) -> Vec<String> {
        let mut problems = Vec::new();
        for ep in self.endpoints {
            let (iface, tap) = (ep.interface.name.clone(), ep.tap_name.clone());
            match ep.detach(&self.ns).await {
                Ok(()) => {
                    info!(log, "pod interface detached"; "interface" => &iface, "tap" => &tap)
                }
                Err(e) => problems.push(format!(
                    "detaching {iface} from TAP {tap}: {:#}",
                    anyhow::Error::from(e)
                )),
            }
        }
        problems
    }
}

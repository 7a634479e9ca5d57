//! Network endpoints of a sandbox.
//!
//! In a real deployment nobody hands the runtime a TAP: containerd runs a CNI plugin, which
//! leaves a network namespace holding an interface (usually a veth) with an address, a MAC and
//! routes. This crate turns each such interface into something a VM can use, the way Kata's
//! "tcfilter" model does:
//!
//! 1. [`scan`] reads the namespace over route netlink (interfaces, addresses, routes);
//! 2. [`attach`] (or [`attach_all`], which scans first) creates a TAP per interface with
//!    [`netdev`] (MTU copied, multi-queue when asked), adds an ingress qdisc on both and a
//!    `mirred` redirect filter in each direction, so every frame arriving on the interface
//!    leaves through the TAP and the other way round;
//! 3. the hypervisor gets the TAP, as queue fds or by name ([`TapHandoff`]), with the
//!    interface's MAC as the guest MAC, and the guest agent gives the guest NIC the
//!    interface's addresses and the namespace's routes ([`GuestInterface`]);
//! 4. [`Endpoint::detach`] removes exactly what attach added (the qdiscs, with their filters,
//!    and the TAP); the interface and the namespace belong to CNI and are left as they were.
//!
//! Attach is all or nothing: a failure half-way undoes the steps done.
//!
//! A runtime that must survive its own crash records [`plan`]'s answer (interface, ifindex,
//! TAP name, persistence) before attaching; [`detach_planned`] later removes whatever part of
//! it exists, with no [`Endpoint`] at hand.
//!
//! Supported kinds: veth, macvlan and ipvlan (a redirect works on any of them). Other kinds
//! are reported as unsupported instead of being skipped.
//!
//! This crate depends on no VMM: it produces [`hypervisor::device::NetworkConfig`]s.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> endpoint::Result<()> {
//! use std::path::Path;
//! let ns = endpoint::NetnsHandle::connect(Path::new("/run/netns/pod1")).await?;
//! let endpoints = endpoint::attach_all(&ns, &endpoint::AttachOptions::default()).await?;
//! for ep in &endpoints {
//!     println!("{} -> {} for guest MAC {}", ep.interface.name, ep.tap_name, ep.guest.mac);
//!     // hand ep.network to Hypervisor::add_device, ep.guest to the agent
//! }
//! for ep in endpoints {
//!     ep.detach(&ns).await?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod address;
mod netlink;
mod scan;
mod tc;

use std::path::PathBuf;
use std::sync::Arc;

use hypervisor::device::{NetworkBackend, NetworkConfig};
use hypervisor::MacAddress;

pub use netlink::NetnsHandle;
pub use scan::{
    scan, GuestRoute, Interface, InterfaceKind, IpNet, NetnsSnapshot, Route, RouteDestination,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace path does not exist.
    #[error("network namespace {} does not exist; pass the path CNI prepared (/run/netns/NAME or /proc/PID/ns/net)", .0.display())]
    NetnsNotFound(PathBuf),
    /// Entering the namespace failed.
    #[error("entering network namespace {}", netns.display())]
    Namespace {
        /// The namespace.
        netns: PathBuf,
        /// The cause.
        #[source]
        source: netdev::Error,
    },
    /// The namespace holds no interface to connect.
    #[error("network namespace {} has no interface besides lo; run the CNI plugin (ADD) first", .0.display())]
    NoInterfaces(PathBuf),
    /// An interface kind this crate cannot connect.
    #[error("interface {name} is a {kind}, which cannot be connected to a VM; supported: veth, macvlan, ipvlan")]
    Unsupported {
        /// Interface name.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// The interface already has an ingress qdisc that is not ours.
    #[error("interface {0} already has an ingress qdisc; another tool owns its ingress, so it cannot be redirected")]
    IngressBusy(String),
    /// The interface disappeared during attach.
    #[error("interface {0} disappeared while it was being attached")]
    Vanished(String),
    /// A netlink request failed.
    #[error("{step}")]
    Netlink {
        /// What was being done.
        step: String,
        /// The kernel's or the library's error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Opening a route netlink socket inside the namespace failed.
    #[error("opening a route netlink socket in {}", netns.display())]
    NetlinkSocket {
        /// The namespace.
        netns: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blocking thread a step ran on ended without an answer (it panicked, or the
    /// runtime shut down).
    #[error("{step}: its blocking thread ended without an answer")]
    Blocking {
        /// What was being done.
        step: String,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The TAP name planned for an interface is taken (another sandbox attached this
    /// namespace, or left its TAP).
    #[error("TAP {tap} for interface {interface} exists already; another sandbox has attached this namespace, or left its TAP")]
    TapExists {
        /// The TAP name.
        tap: String,
        /// The interface it was planned for.
        interface: String,
    },
    /// Creating the TAP failed.
    #[error("creating the TAP for {interface}")]
    Tap {
        /// The interface the TAP is for.
        interface: String,
        /// The cause.
        #[source]
        source: netdev::Error,
    },
    /// Deleting a persistent TAP failed.
    #[error("deleting TAP {tap}")]
    TapDelete {
        /// The TAP.
        tap: String,
        /// The cause.
        #[source]
        source: netdev::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How the hypervisor takes each TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TapHandoff {
    /// Its open queue fds ([`NetworkBackend::TapFds`]); the TAP goes away with the last fd.
    #[default]
    Fds,
    /// Its name ([`NetworkBackend::TapName`]), for a VMM that opens the TAP itself in the
    /// namespace: the TAP is created persistent, attach keeps no fd of it, and detach
    /// deletes it.
    Name,
}

/// How to attach.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Queue pairs of each TAP (and guest NIC); 0 is taken as 1.
    pub queues: u16,
    /// How the hypervisor takes the TAPs.
    pub handoff: TapHandoff,
}

/// What the guest agent must configure on the NIC with `mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// The guest NIC's MAC: the interface's own.
    pub mac: MacAddress,
    /// Addresses with prefix length, as `10.1.0.5/24`.
    pub addresses: Vec<String>,
    /// MTU.
    pub mtu: u32,
    /// Routes through this interface.
    pub routes: Vec<GuestRoute>,
}

/// One attached interface.
#[derive(Debug)]
pub struct Endpoint {
    /// The CNI-created interface.
    pub interface: Interface,
    /// The TAP connected to it.
    pub tap_name: String,
    tap_index: u32,
    /// Persistent ([`TapHandoff::Name`]): detach deletes it.
    persistent: bool,
    /// The device to give the hypervisor (TAP queue fds, guest MAC, queues, MTU).
    pub network: NetworkConfig,
    /// What the guest should configure.
    pub guest: GuestInterface,
}

/// What attaching one interface adds, known before anything is added: enough to undo the
/// attach later from a record, without the process (and the [`Endpoint`]) that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachPlan {
    /// The CNI interface that gets an ingress qdisc and a redirect filter.
    pub interface: String,
    /// Its ifindex when planned (a re-created interface of the same name is not ours).
    pub interface_index: u32,
    /// The TAP that is created, with an ingress qdisc and a redirect filter of its own.
    pub tap: String,
    /// Whether the TAP is persistent ([`TapHandoff::Name`]) and must be deleted.
    pub persistent: bool,
}

/// What [`attach`] will add for each interface of `snapshot` (a [`scan`] of `ns`), in the
/// order it adds them, or the error it would fail with before adding anything. Nothing the
/// plan names exists yet: a planned TAP name already taken is [`Error::TapExists`], an
/// interface with an ingress qdisc already is [`Error::IngressBusy`]. So a record of the
/// plan, written before attaching, names only what the attach adds, and
/// [`detach_planned`] never removes what another owner made.
pub async fn plan(
    ns: &NetnsHandle,
    snapshot: &NetnsSnapshot,
    opts: &AttachOptions,
) -> Result<Vec<AttachPlan>> {
    let mut plans = Vec::new();
    for (n, iface) in candidates(ns, snapshot)?.into_iter().enumerate() {
        let tap = tap_name(n);
        if snapshot.interfaces.iter().any(|i| i.name == tap) {
            return Err(Error::TapExists {
                tap,
                interface: iface.name.clone(),
            });
        }
        if tc::has_ingress(ns, iface.index).await? {
            return Err(Error::IngressBusy(iface.name.clone()));
        }
        plans.push(AttachPlan {
            interface: iface.name.clone(),
            interface_index: iface.index,
            tap,
            persistent: opts.handoff == TapHandoff::Name,
        });
    }
    Ok(plans)
}

/// The interfaces [`attach`] connects, checked to be connectable.
fn candidates<'a>(ns: &NetnsHandle, snapshot: &'a NetnsSnapshot) -> Result<Vec<&'a Interface>> {
    let candidates: Vec<&Interface> = snapshot
        .interfaces
        .iter()
        .filter(|i| !matches!(i.kind, InterfaceKind::Loopback | InterfaceKind::Tap))
        .collect();
    if candidates.is_empty() {
        return Err(Error::NoInterfaces(ns.netns.clone()));
    }
    if let Some(bad) = candidates.iter().find(|i| !i.kind.is_connectable()) {
        return Err(Error::Unsupported {
            name: bad.name.clone(),
            kind: bad.kind.to_string(),
        });
    }
    Ok(candidates)
}

/// The TAP of the `n`th interface.
fn tap_name(n: usize) -> String {
    format!("tap{n}_kata")
}

/// Undoes what attaching `plan` may have added, whatever part of it exists: the ingress
/// qdiscs (with their filters) of the interface, if it is still the planned one, and of the
/// TAP, and the persistent TAP itself. A TAP handed over as fds is gone with its last fd
/// (and its qdisc with it); one still open somewhere cannot be deleted by name and is an
/// [`Error::TapDelete`]. Returns what was removed, as people read it.
pub async fn detach_planned(ns: &NetnsHandle, plan: &AttachPlan) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let snapshot = scan(ns).await?;
    let iface = snapshot
        .interfaces
        .iter()
        .find(|i| i.index == plan.interface_index && i.name == plan.interface);
    if let Some(iface) = iface {
        if tc::del_ingress_if_any(ns, iface.index).await? {
            removed.push(format!("ingress qdisc of {}", plan.interface));
        }
    }
    if let Some(tap) = snapshot.interfaces.iter().find(|i| i.name == plan.tap) {
        if tc::del_ingress_if_any(ns, tap.index).await? {
            removed.push(format!("ingress qdisc of {}", plan.tap));
        }
        match delete_tap(ns, &plan.tap).await {
            Ok(()) => removed.push(format!("TAP {}", plan.tap)),
            Err(Error::TapDelete {
                source: netdev::Error::TapNotFound { .. },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Scans the namespace and attaches every interface in it. All or nothing.
pub async fn attach_all(ns: &NetnsHandle, opts: &AttachOptions) -> Result<Vec<Endpoint>> {
    let snapshot = scan(ns).await?;
    attach(ns, &snapshot, opts).await
}

/// Attaches every interface of `snapshot` (a [`scan`] of `ns`). All or nothing: an
/// interface that is gone by now is [`Error::Vanished`], and what was attached before the
/// failure is detached.
pub async fn attach(
    ns: &NetnsHandle,
    snapshot: &NetnsSnapshot,
    opts: &AttachOptions,
) -> Result<Vec<Endpoint>> {
    let candidates = candidates(ns, snapshot)?;
    let mut done: Vec<Endpoint> = Vec::new();
    for (n, iface) in candidates.into_iter().enumerate() {
        match attach_one(ns, iface, snapshot, n, opts).await {
            Ok(ep) => done.push(ep),
            Err(e) => {
                for ep in done {
                    let _ = ep.detach(ns).await;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

async fn attach_one(
    ns: &NetnsHandle,
    iface: &Interface,
    snapshot: &NetnsSnapshot,
    n: usize,
    opts: &AttachOptions,
) -> Result<Endpoint> {
    let mac = iface.mac.ok_or_else(|| Error::Unsupported {
        name: iface.name.clone(),
        kind: format!("{} without a MAC address", iface.kind),
    })?;
    let tap_name = tap_name(n);
    let queues = opts.queues.max(1);
    let persistent = opts.handoff == TapHandoff::Name;
    let (netns, name, mtu) = (ns.netns.clone(), tap_name.clone(), iface.mtu);
    let tap = tokio::task::spawn_blocking(move || {
        netdev::TapBuilder::new(name)
            .queues(usize::from(queues))
            .multi_queue(queues > 1)
            .mtu(mtu)
            .up(true)
            .persist(persistent)
            .must_create(true)
            .netns(netns)
            .create()
    })
    .await
    .map_err(|source| Error::Blocking {
        step: format!("Creating the TAP for {}", iface.name),
        source,
    })?
    .map_err(|source| Error::Tap {
        interface: iface.name.clone(),
        source,
    })?;
    let tap_index = tap.ifindex();

    // From here, `tap` closing on an error path removes a non-persistent TAP; a persistent
    // one is deleted below, as are the qdiscs.
    let mut added: Vec<u32> = Vec::new();
    let wired = async {
        tc::add_ingress(ns, iface.index, &iface.name).await?;
        added.push(iface.index);
        tc::add_ingress(ns, tap_index, &tap_name).await?;
        added.push(tap_index);
        tc::redirect(ns, iface.index, tap_index, &iface.name).await?;
        tc::redirect(ns, tap_index, iface.index, &tap_name).await
    }
    .await;
    if let Err(e) = wired {
        for index in added {
            let _ = tc::del_ingress(ns, index).await;
        }
        drop(tap);
        if persistent {
            let _ = delete_tap(ns, &tap_name).await;
        }
        // The interface may have gone away under us: say so rather than the netlink errno.
        if !scan(ns)
            .await?
            .interfaces
            .iter()
            .any(|i| i.index == iface.index)
        {
            return Err(Error::Vanished(iface.name.clone()));
        }
        return Err(e);
    }

    let routes = snapshot
        .routes
        .iter()
        .filter(|r| r.oif == Some(iface.index))
        .map(GuestRoute::from)
        .collect();
    let backend = match opts.handoff {
        TapHandoff::Fds => NetworkBackend::TapFds {
            name: tap_name.clone(),
            queues: tap.into_queues().into_iter().map(Arc::new).collect(),
        },
        // Our fds close here; the persistent TAP waits for the VMM to open it by name.
        TapHandoff::Name => NetworkBackend::TapName(tap_name.clone()),
    };
    Ok(Endpoint {
        interface: iface.clone(),
        tap_name,
        tap_index,
        persistent,
        network: NetworkConfig {
            backend,
            guest_mac: mac,
            queue_pairs: queues,
            queue_size: None,
            mtu: Some(iface.mtu),
        },
        guest: GuestInterface {
            mac,
            addresses: iface.addresses.iter().map(ToString::to_string).collect(),
            mtu: iface.mtu,
            routes,
        },
    })
}

/// Deletes the persistent TAP `name` in the namespace of `ns`.
async fn delete_tap(ns: &NetnsHandle, name: &str) -> Result<()> {
    let (netns, tap) = (ns.netns.clone(), name.to_string());
    tokio::task::spawn_blocking(move || netdev::delete_tap(&tap, Some(&netns)))
        .await
        .map_err(|source| Error::Blocking {
            step: format!("Deleting TAP {name}"),
            source,
        })?
        .map_err(|source| Error::TapDelete {
            tap: name.to_string(),
            source,
        })
}

impl Endpoint {
    /// Removes what attach added: the ingress qdiscs (with their filters) of the interface
    /// and of the TAP, and the TAP: a persistent one ([`TapHandoff::Name`]) is deleted, call
    /// this after the VMM let go of it; one handed over as fds disappears once the VMM's
    /// copies are closed too. The interface is left as CNI made it.
    pub async fn detach(self, ns: &NetnsHandle) -> Result<()> {
        self.detach_with(ns, None).await
    }

    /// Like [`detach`](Self::detach), but the TAP fds are closed by `reaper` on its own
    /// thread: the kernel's device teardown (an RCU grace period, ~16 ms) stays off the
    /// caller's path, and the reaper's `flush` (or drop) waits for it, so nothing leaks.
    pub async fn detach_with(
        self,
        ns: &NetnsHandle,
        reaper: Option<&netdev::Reaper>,
    ) -> Result<()> {
        let first = tc::del_ingress(ns, self.interface.index).await;
        // The TAP may already be gone (the VMM exited): its qdisc went with it.
        let _ = tc::del_ingress(ns, self.tap_index).await;
        let deleted = if self.persistent {
            match delete_tap(ns, &self.tap_name).await {
                Err(Error::TapDelete {
                    source: netdev::Error::TapNotFound { .. },
                    ..
                }) => Ok(()),
                other => other,
            }
        } else {
            Ok(())
        };
        if let (Some(reaper), NetworkBackend::TapFds { queues, .. }) =
            (reaper, self.network.backend)
        {
            // Fds still shared with someone else close when they drop theirs.
            let owned = queues.into_iter().filter_map(|q| Arc::try_unwrap(q).ok());
            reaper.close_fds(owned.collect());
        }
        first.and(deleted)
    }
}

//! TAP devices in pure Rust over `nix` and `libc`.
//!
//! This crate owns everything about a VM's TAP devices on the host: creating or
//! opening them by name or template ([`TapBuilder`]), their TUN flags (always
//! `IFF_TAP | IFF_NO_PI`; vnet header, offloads, persistence, owner and group),
//! multi-queue fds, link settings (MTU, address, up/down), doing all of this inside a
//! network namespace without moving the calling thread ([`TapBuilder::netns`],
//! [`run_in`], [`NetNs`]), adopting fds opened elsewhere ([`adopt`]), handing fds to
//! a VMM ([`send_with_fds`], [`ChildFds`]), teardown off the critical path
//! ([`Reaper`]), and, with the `tokio` feature, async frame I/O (`AsyncTapQueue`).
//!
//! It must not depend on any hypervisor or VMM crate (Dragonball's `dbs-*` included,
//! dev-dependencies too), on bindgen output or on C code: ioctl numbers come from
//! `libc`, and the `unsafe` is confined to a private module of small helpers.
//!
//! Every fd the crate opens is close-on-exec. Errors are [`Error`] values that name
//! the step and the object and say what to do.
//!
//! # Example
//!
//! A four-queue TAP with a 12-byte vnet header inside a named namespace, its queue
//! fds given to a child process as fds 3 to 6:
//!
//! ```no_run
//! use netdev::{ChildFds, NetNs, Offloads, TapBuilder};
//!
//! # fn main() -> netdev::Result<()> {
//! let ns = NetNs::create("sandbox-1")?;
//! let tap = TapBuilder::new("tap%d")
//!     .netns(ns.path())
//!     .multi_queue(true)
//!     .queues(4)
//!     .vnet_hdr(Some(12))
//!     .offloads(Offloads::virtio_default())
//!     .mtu(1500)
//!     .up(true)
//!     .create()?;
//! println!("created {} (ifindex {})", tap.name(), tap.ifindex());
//!
//! let mut fds = ChildFds::new();
//! let numbers = fds.extend(tap.into_queues());
//! assert_eq!(numbers, [3, 4, 5, 6]);
//! let mut vmm = std::process::Command::new("qemu-system-x86_64");
//! fds.apply(&mut vmm)?;
//! # Ok(()) }
//! ```
//!
//! # Costs
//!
//! Creating and configuring a TAP takes a few hundred microseconds; closing the
//! last fd of a queue waits for an RCU grace period (about 16 ms). [`Reaper`] moves
//! that wait to a background thread.

#![warn(missing_docs)]

mod error;
mod handoff;
mod name;
pub mod netns;
mod reaper;
mod sys;
mod tap;

#[cfg(feature = "tokio")]
mod async_queue;

#[cfg(feature = "tokio")]
pub use async_queue::AsyncTapQueue;
pub use error::{Error, Result};
#[cfg(feature = "tokio")]
pub use handoff::send_with_fds_async;
pub use handoff::{send_with_fds, ChildFds};
pub use name::{validate as validate_name, MAX_NAME_LEN};
pub use netns::{delete_path as delete_netns, run_in, NetNs, NETNS_RUN_DIR};
pub use reaper::Reaper;
pub use tap::{
    adopt, attach_queue, delete_tap, AdoptedTap, LinkState, Offloads, Tap, TapBuilder, TapFlags,
    VNET_HDR_LEN_MIN, VNET_HDR_LEN_V1,
};

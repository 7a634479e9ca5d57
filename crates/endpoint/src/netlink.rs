//! A route-netlink connection bound to a network namespace.
//!
//! A netlink socket belongs to the namespace it was created in, for its whole life. So the
//! socket is created on a short-lived thread that entered the namespace (`netdev::run_in`),
//! and then driven by `rtnetlink` on the caller's tokio runtime: no tokio worker ever changes
//! namespace.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use rtnetlink::Handle;

use crate::{Error, Result};

/// An rtnetlink handle whose requests act inside one namespace.
#[derive(Debug, Clone)]
pub struct NetnsHandle {
    /// The namespace.
    pub netns: PathBuf,
    /// The rtnetlink handle.
    pub handle: Handle,
}

impl NetnsHandle {
    /// Connects to route netlink inside `netns`. Must be called within a tokio runtime; the
    /// connection task runs on it until every clone of the handle is dropped.
    pub async fn connect(netns: &Path) -> Result<NetnsHandle> {
        if !netns.exists() {
            return Err(Error::NetnsNotFound(netns.to_path_buf()));
        }
        let path = netns.to_path_buf();
        let fd = tokio::task::spawn_blocking(move || {
            netdev::run_in(&path, || {
                Socket::new(NETLINK_ROUTE).map(IntoRawFd::into_raw_fd)
            })
        })
        .await
        .map_err(|source| Error::Blocking {
            step: format!("Opening netlink in {}", netns.display()),
            source,
        })?
        .map_err(|source| Error::Namespace {
            netns: netns.to_path_buf(),
            source,
        })?
        .map_err(|source| Error::NetlinkSocket {
            netns: netns.to_path_buf(),
            source,
        })?;
        // SAFETY: `fd` was just created by `Socket::new` and released with `into_raw_fd`;
        // nothing else owns it, and `TokioSocket` takes ownership.
        let socket = unsafe { TokioSocket::from_raw_fd(fd) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(connection);
        Ok(NetnsHandle {
            netns: netns.to_path_buf(),
            handle,
        })
    }
}

//! `delete`: containerd runs it after a task is deleted, and for a shim that died. It
//! unmounts the bundle's root filesystem if the shim left it mounted, removes what a dead
//! shim's sandbox left (from its record, as `sandbox cleanup` does) and its socket, and prints the
//! `DeleteResponse` containerd reads. It does nothing to a sandbox whose shim runs, and
//! succeeds when there is nothing to remove.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Result};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;

use super::bundle;
use super::events::timestamp;
use super::flags::Flags;
use super::start;
use crate::cleanup;

/// The status containerd is told for a task whose shim is gone: killed (128 + SIGKILL).
const KILLED: u32 = 128 + 9;

/// `delete`: see the module docs.
pub fn run(flags: &Flags, run_root: &Path) -> Result<()> {
    if flags.id.is_empty() {
        bail!("delete needs -id");
    }
    let bundle_dir = flags.bundle()?;
    bundle::unmount_rootfs(&bundle_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(cleanup::dead(run_root, &flags.id))?;
    // The socket of a shim that died stays behind: nobody answers on it.
    let sandbox_id = bundle::read_spec(&bundle_dir)
        .map(|spec| bundle::sandbox_id(&spec, &flags.id))
        .unwrap_or_else(|_| flags.id.clone());
    let socket = start::socket_path(&flags.address, &flags.namespace, &sandbox_id);
    if socket.exists() && UnixStream::connect(&socket).is_err() {
        let _ = std::fs::remove_file(&socket);
    }
    for problem in &report.problems {
        eprintln!("containerd-shim-kata-v2: delete {}: {problem}", flags.id);
    }
    let response = DeleteResponse {
        pid: 0,
        exit_status: KILLED,
        exited_at: timestamp(SystemTime::now()),
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&response.write_to_bytes()?)?;
    out.flush()?;
    if !report.problems.is_empty() {
        bail!("{}", report.problems.join("; "));
    }
    Ok(())
}

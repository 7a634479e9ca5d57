//! `start`: the shim's socket, and the daemon that serves it.
//!
//! containerd runs `start` in the bundle directory and reads the socket address from its
//! output. The socket is named as containerd names its shims' sockets (the SHA-256 of its own
//! address, the namespace and the id, under `/run/containerd/s/`), the id being the pod
//! sandbox's for a CRI container of a pod: the pod's containers then all find the pod's shim,
//! which is already listening, and `start` only prints its address. Otherwise `start` binds
//! the socket and spawns the daemon with it as fd 3, in a session of its own with no stdio
//! (containerd reads `start`'s output to its end), writes `address` and `shim.pid` in the
//! bundle (containerd reads `address` again when it restarts), and prints the address.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use command_fds::{CommandFdExt, FdMapping};
use sha2::{Digest, Sha256};

use super::bundle;
use super::flags::Flags;

/// The directory containerd's shim sockets live in.
const SOCKET_DIR: &str = "/run/containerd/s";
/// The fd the daemon finds its listening socket on (containerd's shims use 3 too).
pub const LISTENER_FD: i32 = 3;

/// The socket path of the shim serving sandbox `sandbox_id` for containerd at `address`,
/// in namespace `namespace`.
pub fn socket_path(address: &str, namespace: &str, sandbox_id: &str) -> PathBuf {
    let joined = Path::new(address).join(namespace).join(sandbox_id);
    let digest = Sha256::digest(joined.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(hex)
}

/// `start`: see the module docs. Prints the address on stdout.
pub fn run(flags: &Flags) -> Result<()> {
    if flags.id.is_empty() || flags.namespace.is_empty() {
        bail!("start needs -id and -namespace");
    }
    let bundle = flags.bundle()?;
    let spec = bundle::read_spec(&bundle)?;
    let sandbox_id = bundle::sandbox_id(&spec, &flags.id);
    let path = socket_path(&flags.address, &flags.namespace, &sandbox_id);
    let address = format!("unix://{}", path.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(SOCKET_DIR)
        .with_context(|| format!("Creating {SOCKET_DIR}"))?;

    let listener = match UnixListener::bind(&path) {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(&path).is_ok() {
                // The pod's shim (or this task's, started before) serves it.
                None
            } else {
                // Left by a shim that died: nobody answers on it.
                std::fs::remove_file(&path)
                    .with_context(|| format!("Removing the stale socket {}", path.display()))?;
                Some(
                    UnixListener::bind(&path)
                        .with_context(|| format!("Binding {}", path.display()))?,
                )
            }
        }
        Err(e) => return Err(e).with_context(|| format!("Binding {}", path.display())),
    };
    if let Some(listener) = listener {
        let daemon = Flags {
            socket: path.display().to_string(),
            ..flags.clone()
        };
        match spawn_daemon(&daemon, &bundle, &listener) {
            Ok(pid) => write_file(&bundle.join("shim.pid"), &pid.to_string())?,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        }
    }
    write_file(&bundle.join("address"), &address)?;
    let mut out = std::io::stdout().lock();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn spawn_daemon(flags: &Flags, bundle: &Path, listener: &UnixListener) -> Result<u32> {
    let exe = std::env::current_exe().context("Finding the shim's own binary")?;
    let mut cmd = Command::new(&exe);
    cmd.args(flags.daemon_args())
        .current_dir(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let fd = listener
        .try_clone()
        .context("Duplicating the listening socket")?;
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: fd.into(),
        child_fd: LISTENER_FD,
    }])
    .context("Passing the listening socket")?;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("Starting the shim daemon {}", exe.display()))?;
    Ok(child.id())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("Writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_follow_containerd() {
        // `echo -n /run/containerd/containerd.sock/default/redis | sha256sum`
        assert_eq!(
            socket_path("/run/containerd/containerd.sock", "default", "redis"),
            Path::new(
                "/run/containerd/s/f6b99128c07bdbd0902363ba979c22f8ef053e683a7ce24dd016a1ab17092c33"
            )
        );
        assert_ne!(
            socket_path("/a.sock", "k8s.io", "pod1"),
            socket_path("/b.sock", "k8s.io", "pod1")
        );
    }
}

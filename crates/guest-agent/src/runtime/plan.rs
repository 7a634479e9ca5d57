//! Turning a spec into the child's prepared steps ([`Plan`]).

use std::os::fd::RawFd;
use std::path::Path;

use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Process, Spec};

use super::caps::cap_sets;
use super::child::{Op, Plan};
use super::mounts::{cstring, linux_ops, mount_ops, spec_device_ops};
use super::Error;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the child's stdio comes from: the child ends of pipes, or (with a terminal) a pty the
/// child allocates in the container.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildStdio {
    /// The pipes' child ends; -1 each with a terminal.
    pub(crate) fds: [RawFd; 3],
    pub(crate) terminal: Option<ChildTerminal>,
}

/// A terminal to allocate in the container.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildTerminal {
    /// The child's end of the console socket the master goes back on.
    pub(crate) socket: RawFd,
    pub(crate) rows: u16,
    pub(crate) cols: u16,
}

fn stdio_op(stdio: ChildStdio) -> (Op, String) {
    (
        Op::Stdio {
            fds: stdio.fds,
            console: stdio.terminal.map_or(-1, |t| t.socket),
        },
        "Setting up stdio".to_string(),
    )
}

/// The terminal's steps, once the container's `/dev` is in place (the init's mounts done, or the
/// container's mount namespace joined) and before credentials change.
fn terminal_ops(stdio: ChildStdio, ops: &mut Vec<(Op, String)>) {
    let Some(ChildTerminal { rows, cols, .. }) = stdio.terminal else {
        return;
    };
    ops.extend([
        (
            Op::OpenPtmx,
            "Opening the container's /dev/ptmx".to_string(),
        ),
        (
            Op::TerminalSize { rows, cols },
            format!("Setting the terminal size to {rows}x{cols}"),
        ),
        (Op::UnlockPty, "Unlocking the pty".to_string()),
        (Op::OpenPtySlave, "Opening the pty slave".to_string()),
        (
            Op::SendPtyMaster,
            "Sending the pty master to the runtime".to_string(),
        ),
        (
            Op::TerminalStdio,
            "Making the pty slave stdio and the controlling terminal".to_string(),
        ),
    ]);
}

fn finish(ops: Vec<(Op, String)>, process: &Process, id: &str) -> Result<Plan, Error> {
    let args = process.args().as_deref().unwrap_or(&[]);
    let Some(arg0) = args.first() else {
        return Err(Error::InvalidSpec {
            id: id.to_string(),
            reason: "the process has no args".to_string(),
        });
    };
    let argv = args
        .iter()
        .map(|a| cstring(id, "an argument", a.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let env = process
        .env()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|e| cstring(id, "an environment variable", e.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut ops, mut names): (Vec<Op>, Vec<String>) = ops.into_iter().unzip();
    names.push(format!("Executing \"{arg0}\""));
    // Keep the compiler honest: one name per op, plus the exec.
    debug_assert_eq!(names.len(), ops.len() + 1);
    ops.shrink_to_fit();
    Ok(Plan {
        ops,
        names,
        argv,
        env,
    })
}

/// The steps common to an init and an exec'd process, after the root is in place.
fn process_ops(id: &str, process: &Process, ops: &mut Vec<(Op, String)>) -> Result<(), Error> {
    for rlimit in process.rlimits().as_deref().unwrap_or(&[]) {
        let resource = rlimit_resource(rlimit.typ());
        ops.push((
            Op::Rlimit {
                resource,
                soft: rlimit.soft(),
                hard: rlimit.hard(),
            },
            format!(
                "Setting rlimit {:?} to {}/{}",
                rlimit.typ(),
                rlimit.soft(),
                rlimit.hard()
            ),
        ));
    }
    let cwd = process.cwd();
    ops.push((
        Op::Chdir(cstring(id, "cwd", cwd.as_os_str().as_encoded_bytes())?),
        format!("Changing to the working directory {}", cwd.display()),
    ));
    if process.no_new_privileges().unwrap_or(false) {
        ops.push((Op::NoNewPrivileges, "Setting no_new_privileges".to_string()));
    }
    let user = process.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    let caps = match process.capabilities() {
        Some(caps) => Some(cap_sets(id, caps)?),
        None => None,
    };
    if let Some(caps) = caps {
        ops.push((
            Op::DropBounding {
                keep: caps.bounding,
                last: caps.last,
            },
            "Dropping capabilities from the bounding set".to_string(),
        ));
        ops.push((Op::KeepCaps(true), "Keeping capabilities".to_string()));
    }
    ops.push((
        Op::Groups(groups.clone()),
        format!(
            "Setting additional groups {:?}",
            groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>()
        ),
    ));
    ops.push((
        Op::Gid(Gid::from_raw(user.gid())),
        format!("Setting gid {}", user.gid()),
    ));
    ops.push((
        Op::Uid(Uid::from_raw(user.uid())),
        format!("Setting uid {}", user.uid()),
    ));
    if let Some(caps) = caps {
        ops.push((
            Op::KeepCaps(false),
            "Clearing keep-capabilities".to_string(),
        ));
        ops.push((Op::SetCaps(caps), "Setting capabilities".to_string()));
    }
    if let Some(mask) = user.umask() {
        ops.push((
            Op::Umask(nix::sys::stat::Mode::from_bits_truncate(mask)),
            format!("Setting umask {mask:o}"),
        ));
    }
    let args = process.args().as_deref().unwrap_or(&[]);
    if let Some(arg0) = args.first() {
        let path = process
            .env()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let candidates: Vec<String> = if arg0.contains('/') {
            vec![arg0.clone()]
        } else {
            path.split(':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| format!("{}/{arg0}", dir.trim_end_matches('/')))
                .collect()
        };
        ops.push((
            Op::Lookup(
                candidates
                    .into_iter()
                    .map(|c| cstring(id, "an argument", c))
                    .collect::<Result<_, _>>()?,
            ),
            format!("Finding the executable \"{arg0}\""),
        ));
    }
    Ok(())
}

fn rlimit_resource(typ: PosixRlimitType) -> Resource {
    match typ {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// The plan of a container's init: new root, mounts, hostname, then the process, then a wait for
/// `start`.
pub(crate) fn init_plan(
    id: &str,
    rootfs: &Path,
    spec: &Spec,
    stdio: ChildStdio,
) -> Result<Plan, Error> {
    let Some(process) = spec.process() else {
        return Err(Error::InvalidSpec {
            id: id.to_string(),
            reason: "the spec has no process".to_string(),
        });
    };
    let root = cstring(id, "rootfs", rootfs.as_os_str().as_encoded_bytes())?;
    let mut ops = vec![
        stdio_op(stdio),
        (Op::ResetSignals, "Resetting signals".to_string()),
        (
            Op::MakeRootPrivate,
            "Making the container's mounts private".to_string(),
        ),
        (
            Op::Mount {
                source: Some(root.clone()),
                target: root.clone(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
            },
            format!("Bind-mounting the rootfs {}", rootfs.display()),
        ),
        (
            Op::Mount {
                source: None,
                target: root.clone(),
                fstype: None,
                flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                data: None,
            },
            format!("Making the rootfs mount {} private", rootfs.display()),
        ),
    ];
    ops.extend(mount_ops(
        id,
        rootfs,
        spec.mounts().as_deref().unwrap_or(&[]),
    )?);
    let linux = spec.linux().as_ref();
    if let Some(devices) = linux.and_then(|l| l.devices().as_deref()) {
        ops.extend(spec_device_ops(id, rootfs, devices)?);
    }
    ops.push((
        Op::PivotRoot(root),
        format!("Pivoting the root to {}", rootfs.display()),
    ));
    if let Some(linux) = linux {
        ops.extend(linux_ops(id, linux)?);
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        ops.push((
            Op::Mount {
                source: None,
                target: c"/".into(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                data: None,
            },
            "Remounting the root read-only".to_string(),
        ));
    }
    if let Some(hostname) = spec.hostname() {
        ops.push((
            Op::Hostname(cstring(id, "hostname", hostname.as_str())?),
            format!("Setting hostname \"{hostname}\""),
        ));
    }
    terminal_ops(stdio, &mut ops);
    process_ops(id, process, &mut ops)?;
    ops.push((Op::AwaitStart, "Waiting for start".to_string()));
    finish(ops, process, id)
}

/// The plan of a process exec'd into a running container whose init's pidfd is `init`.
pub(crate) fn exec_plan(
    id: &str,
    init: RawFd,
    process: &Process,
    stdio: ChildStdio,
) -> Result<Plan, Error> {
    let mut ops = vec![
        (
            Op::Setns {
                fd: init,
                flags: CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWPID
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWIPC,
            },
            "Joining the container's namespaces".to_string(),
        ),
        (
            Op::Fork,
            "Forking into the container's PID namespace".to_string(),
        ),
        stdio_op(stdio),
        (Op::ResetSignals, "Resetting signals".to_string()),
    ];
    terminal_ops(stdio, &mut ops);
    process_ops(id, process, &mut ops)?;
    finish(ops, process, id)
}

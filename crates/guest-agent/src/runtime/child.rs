//! What a new process does between `clone` and `execve`.
//!
//! The agent is multi-threaded, so the child may only make async-signal-safe calls: it must not
//! allocate, lock or panic. The parent prepares everything first (paths as `CString`s, argv and
//! env pointer arrays, group lists) as a list of [`Op`]s; the child runs them in order and, on the
//! first failure, writes the op's index and the errno to the status pipe and exits. The parent
//! names the step from the same index (see [`Plan::names`]). The status pipe is close-on-exec, so
//! a successful `execve` shows as end-of-file.

use std::ffi::{c_char, CStr, CString, OsStr};
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::caps::CapSets;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, CloneFlags};
use nix::sys::resource::Resource;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::{mknod, umask, Mode, SFlag};
use nix::unistd::{
    access, chdir, chroot, mkdir, pivot_root, sethostname, setsid, AccessFlags, Gid, Uid,
};

/// Status record code: setup finished, waiting for start.
pub(crate) const READY: u32 = u32::MAX;
/// Status record code: the value is the pid of the process forked into the container.
pub(crate) const FORKED: u32 = u32::MAX - 1;

/// One prepared step of the child.
#[derive(Debug)]
pub(crate) enum Op {
    /// Stdio onto 0, 1, 2 (closed where -1: a terminal comes later); the status pipe onto 3, the
    /// start pipe onto 4, the console socket onto 5; everything else closed; a new session.
    Stdio {
        fds: [RawFd; 3],
        console: RawFd,
    },
    /// Every mount of the new namespace made private, so nothing propagates back to the agent's.
    /// An agent chrooted into a directory that is not a mount point cannot: its root's mounts
    /// keep the propagation its chroot's maker gave them (the rootfs bind is made private anyway).
    MakeRootPrivate,
    /// Default dispositions and an empty signal mask.
    ResetSignals,
    Setns {
        fd: RawFd,
        flags: CloneFlags,
    },
    /// Fork into the PID namespace joined by the `Setns` ops, as a sibling (`CLONE_PARENT`): the
    /// new process is the agent's child. The forking process reports its pid and exits.
    Fork,
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
    /// `mkdir`, an existing directory is fine.
    Mkdir(CString),
    /// Creates an empty file (a bind mount target), an existing one is fine.
    Touch(CString),
    Mknod {
        path: CString,
        mode: Mode,
        kind: SFlag,
        dev: libc::dev_t,
        /// Bind-mounted over an empty file when `mknod` is refused.
        fallback: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Chown {
        path: CString,
        uid: Uid,
        gid: Gid,
    },
    /// A masked path: `/dev/null` bound over a file, an empty read-only tmpfs over a directory;
    /// a path that does not exist is fine.
    Mask(CString),
    /// A path bound onto itself and remounted read-only; a path that does not exist is fine.
    ReadOnly(CString),
    /// Writes a value to a file (a sysctl under `/proc/sys`).
    Write {
        path: CString,
        value: CString,
    },
    /// `pivot_root(".", ".")` in the new root, then the old root unmounted with `MNT_DETACH`
    /// (on an initramfs root, which cannot be pivoted: `MS_MOVE` onto `/` and `chroot`).
    PivotRoot(CString),
    Umask(Mode),
    Hostname(CString),
    Rlimit {
        resource: Resource,
        soft: u64,
        hard: u64,
    },
    Chdir(CString),
    NoNewPrivileges,
    Groups(Vec<Gid>),
    Gid(Gid),
    Uid(Uid),
    /// Drops every capability not in `keep` from the bounding set.
    DropBounding {
        keep: u64,
        last: u32,
    },
    /// `PR_SET_KEEPCAPS`: keep the permitted set across the switch to a non-root uid.
    KeepCaps(bool),
    /// Sets the effective, permitted and inheritable sets, and raises the ambient ones.
    SetCaps(CapSets),
    /// Finds the executable among the candidates (the `PATH` lookup, done inside the root).
    Lookup(Vec<CString>),
    /// Opens the container's `/dev/ptmx`: a pty of the container's devpts instance.
    OpenPtmx,
    /// `TIOCSWINSZ` on the new pty's master.
    TerminalSize {
        rows: u16,
        cols: u16,
    },
    /// `TIOCSPTLCK` with 0 (`unlockpt`).
    UnlockPty,
    /// `TIOCGPTPEER`: the slave, opened through the master (no path lookup).
    OpenPtySlave,
    /// The master to the runtime over the console socket (`SCM_RIGHTS`); both closed here after.
    SendPtyMaster,
    /// The pty slave onto 0, 1 and 2, and as the controlling terminal (`TIOCSCTTY`).
    TerminalStdio,
    /// Reports readiness, then blocks until the start pipe gives a byte (end-of-file: exit).
    AwaitStart,
}

/// Everything the child needs, prepared by the parent.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) ops: Vec<Op>,
    /// A name per op, then one for the final `execve`.
    pub(crate) names: Vec<String>,
    pub(crate) argv: Vec<CString>,
    pub(crate) env: Vec<CString>,
}

/// The status pipe's record: an op index (or [`READY`], [`FORKED`]) and an errno or pid.
pub(crate) fn encode(code: u32, value: i32) -> [u8; 8] {
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&code.to_le_bytes());
    record[4..].copy_from_slice(&value.to_le_bytes());
    record
}

pub(crate) fn decode(record: [u8; 8]) -> (u32, i32) {
    let [a, b, c, d, e, f, g, h] = record;
    (
        u32::from_le_bytes([a, b, c, d]),
        i32::from_le_bytes([e, f, g, h]),
    )
}

/// Pointer arrays for `execve`, built before the clone.
pub(crate) struct ExecArrays {
    argv: Vec<*const c_char>,
    env: Vec<*const c_char>,
}

impl ExecArrays {
    pub(crate) fn new(plan: &Plan) -> ExecArrays {
        let arr = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ExecArrays {
            argv: arr(&plan.argv),
            env: arr(&plan.env),
        }
    }
}

/// Where the child is: its status and start pipes and console socket (renumbered by `Stdio`),
/// its pty's ends while the terminal is being set up, and the found binary.
struct State {
    status: RawFd,
    start: RawFd,
    console: RawFd,
    master: RawFd,
    slave: RawFd,
    exe: Option<*const c_char>,
}

fn report(fd: RawFd, code: u32, value: i32) {
    // SAFETY: the fd is the child's status pipe, open for its whole life.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = nix::unistd::write(fd, &encode(code, value));
}

fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without running Rust or libc exit handlers, which must not
    // run in a child of a multi-threaded parent.
    unsafe { libc::_exit(code) }
}

/// Runs the plan in the child and executes the program. Never returns.
///
/// # Safety
/// Must only be called in a child just created by `clone` (single-threaded, a copy of the
/// parent's memory). `status` and `start` are that child's pipe ends.
pub(crate) unsafe fn run(plan: &Plan, arrays: &ExecArrays, status: RawFd, start: RawFd) -> ! {
    let mut state = State {
        status,
        start,
        console: -1,
        master: -1,
        slave: -1,
        exe: None,
    };
    for (index, op) in plan.ops.iter().enumerate() {
        if let Err(errno) = run_op(op, &mut state) {
            report(state.status, index as u32, errno as i32);
            exit(1);
        }
    }
    let path = state.exe.unwrap_or(arrays.argv[0]);
    // SAFETY: `path`, `argv` and `env` point into NUL-terminated strings and null-terminated
    // arrays the parent built and that live in this copy of its memory.
    unsafe { libc::execve(path, arrays.argv.as_ptr(), arrays.env.as_ptr()) };
    report(state.status, plan.ops.len() as u32, Errno::last() as i32);
    exit(127)
}

fn run_op(op: &Op, state: &mut State) -> Result<(), Errno> {
    match op {
        Op::Stdio { fds, console } => stdio(*fds, *console, state),
        Op::MakeRootPrivate => {
            let none = None::<&CStr>;
            let flags = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
            match mount(none, c"/", none, flags, none) {
                Err(Errno::EINVAL) => Ok(()),
                other => other,
            }
        }
        Op::ResetSignals => {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            for signal in Signal::iterator() {
                if signal != Signal::SIGKILL && signal != Signal::SIGSTOP {
                    // SAFETY: installing the default disposition runs no code of ours.
                    let _ = unsafe { sigaction(signal, &default) };
                }
            }
            SigSet::empty().thread_set_mask()
        }
        Op::Setns { fd, flags } => {
            // SAFETY: the fd was opened by the parent and stays open in this child.
            setns(unsafe { BorrowedFd::borrow_raw(*fd) }, *flags)
        }
        Op::Fork => {
            // SAFETY: this child is single-threaded; the new process only runs the rest of the
            // plan (async-signal-safe) and execs.
            let pid = unsafe { clone(libc::CLONE_PARENT as u64, None) }?;
            if pid != 0 {
                report(state.status, FORKED, pid);
                exit(0);
            }
            Ok(())
        }
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => mount(
            source.as_deref(),
            target.as_c_str(),
            fstype.as_deref(),
            *flags,
            data.as_deref(),
        ),
        Op::Mkdir(path) => match mkdir(path.as_c_str(), Mode::from_bits_truncate(0o755)) {
            Err(Errno::EEXIST) => Ok(()),
            other => other,
        },
        Op::Touch(path) => touch(path),
        Op::Mknod {
            path,
            mode,
            kind,
            dev,
            fallback,
        } => match mknod(path.as_c_str(), *kind, *mode, *dev) {
            Ok(()) => Ok(()),
            Err(Errno::EPERM) => {
                touch(path)?;
                mount(
                    Some(fallback.as_c_str()),
                    path.as_c_str(),
                    None::<&CStr>,
                    MsFlags::MS_BIND,
                    None::<&CStr>,
                )
            }
            Err(errno) => Err(errno),
        },
        Op::Symlink { target, link } => {
            // SAFETY: both are NUL-terminated strings the parent prepared.
            if unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } < 0 {
                match Errno::last() {
                    Errno::EEXIST => Ok(()),
                    errno => Err(errno),
                }
            } else {
                Ok(())
            }
        }
        Op::Chown { path, uid, gid } => nix::unistd::chown(path.as_c_str(), Some(*uid), Some(*gid)),
        Op::Mask(path) => {
            let none = None::<&CStr>;
            match mount(
                Some(c"/dev/null"),
                path.as_c_str(),
                none,
                MsFlags::MS_BIND,
                none,
            ) {
                Err(Errno::ENOENT) => Ok(()),
                Err(Errno::ENOTDIR) => mount(
                    Some(c"tmpfs"),
                    path.as_c_str(),
                    Some(c"tmpfs"),
                    MsFlags::MS_RDONLY,
                    none,
                ),
                other => other,
            }
        }
        Op::ReadOnly(path) => {
            let none = None::<&CStr>;
            let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
            match mount(Some(path.as_c_str()), path.as_c_str(), none, bind, none) {
                Err(Errno::ENOENT) => Ok(()),
                Err(errno) => Err(errno),
                Ok(()) => mount(
                    none,
                    path.as_c_str(),
                    none,
                    bind | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    none,
                ),
            }
        }
        Op::Write { path, value } => {
            // SAFETY: open with a NUL-terminated path; the fd is closed below.
            let fd = Errno::result(unsafe {
                libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC)
            })?;
            // SAFETY: `fd` was just opened and is owned here.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            nix::unistd::write(&fd, value.as_bytes()).map(drop)
        }
        Op::PivotRoot(root) => {
            chdir(root.as_c_str())?;
            match pivot_root(c".", c".") {
                Ok(()) => umount2(c".", MntFlags::MNT_DETACH)?,
                // The agent's root is the initramfs (rootfs), which has no parent mount and so
                // cannot be pivoted: move the new root over it and chroot, as runc's no-pivot
                // mode does. The agent's other mounts stay in this namespace, hidden below.
                Err(Errno::EINVAL) => {
                    let none = None::<&CStr>;
                    mount(Some(c"."), c"/", none, MsFlags::MS_MOVE, none)?;
                    chroot(c".")?;
                }
                Err(errno) => return Err(errno),
            }
            chdir(c"/")
        }
        Op::Umask(mode) => {
            umask(*mode);
            Ok(())
        }
        Op::Hostname(name) => sethostname(OsStr::from_bytes(name.to_bytes())),
        Op::Rlimit {
            resource,
            soft,
            hard,
        } => {
            let limit = libc::rlimit64 {
                rlim_cur: *soft,
                rlim_max: *hard,
            };
            // A raw prlimit64: some libcs' setrlimit broadcasts to every thread they know of,
            // which after a bare clone includes the parent's.
            // SAFETY: prlimit64 on this process reads one rlimit64 from a live local.
            Errno::result(unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *resource as libc::c_int,
                    &limit as *const libc::rlimit64,
                    std::ptr::null_mut::<libc::rlimit64>(),
                )
            })
            .map(drop)
        }
        Op::Chdir(dir) => chdir(dir.as_c_str()),
        Op::NoNewPrivileges => nix::sys::prctl::set_no_new_privs(),
        // Raw system calls: glibc's wrappers broadcast the change to every thread it knows of,
        // and after a bare clone it still believes the parent's threads exist (and would wait
        // for them forever). Credentials are per thread in the kernel; this child has one.
        Op::Groups(groups) => {
            // SAFETY: setgroups reads `len` gids from a live slice.
            Errno::result(unsafe {
                libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr())
            })
            .map(drop)
        }
        Op::Gid(gid) => {
            let gid = gid.as_raw();
            // SAFETY: setgid takes an integer (as root it sets the real, effective and saved gid;
            // unlike setresgid, -1 is refused rather than meaning "unchanged").
            Errno::result(unsafe { libc::syscall(libc::SYS_setgid, gid) }).map(drop)
        }
        Op::Uid(uid) => {
            let uid = uid.as_raw();
            // SAFETY: setuid takes an integer (as root it sets the real, effective and saved uid;
            // unlike setresuid, -1 is refused rather than meaning "unchanged").
            Errno::result(unsafe { libc::syscall(libc::SYS_setuid, uid) }).map(drop)
        }
        Op::DropBounding { keep, last } => {
            for cap in 0..=*last {
                if keep & (1 << cap) == 0 {
                    prctl(libc::PR_CAPBSET_DROP, cap as u64, 0)?;
                }
            }
            Ok(())
        }
        Op::KeepCaps(keep) => prctl(libc::PR_SET_KEEPCAPS, u64::from(*keep), 0),
        Op::SetCaps(sets) => {
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let half = |mask: u64, high: bool| (if high { mask >> 32 } else { mask }) as u32;
            let data = [false, true].map(|high| CapData {
                effective: half(sets.effective, high),
                permitted: half(sets.permitted, high),
                inheritable: half(sets.inheritable, high),
            });
            // SAFETY: capset reads one header and two data records from live locals.
            Errno::result(unsafe {
                libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
            })?;
            for cap in 0..=sets.last {
                if sets.ambient & (1 << cap) != 0 {
                    prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as u64,
                        cap as u64,
                    )?;
                }
            }
            Ok(())
        }
        Op::Lookup(candidates) => {
            let mut last = Errno::ENOENT;
            for path in candidates {
                match access(path.as_c_str(), AccessFlags::X_OK) {
                    Ok(()) => {
                        state.exe = Some(path.as_ptr());
                        return Ok(());
                    }
                    // A later PATH entry may have it; remember the most telling error.
                    Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
                    Err(errno) => last = errno,
                }
            }
            Err(last)
        }
        Op::OpenPtmx => {
            let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
            // SAFETY: open with a NUL-terminated literal path.
            let fd = Errno::result(unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) })?;
            state.master = above_stdio(fd)?;
            Ok(())
        }
        Op::TerminalSize { rows, cols } => {
            let size = libc::winsize {
                ws_row: *rows,
                ws_col: *cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize from a live local.
            Errno::result(unsafe {
                libc::ioctl(
                    state.master,
                    libc::TIOCSWINSZ,
                    &size as *const libc::winsize,
                )
            })
            .map(drop)
        }
        Op::UnlockPty => {
            let unlock: libc::c_int = 0;
            // SAFETY: TIOCSPTLCK reads one c_int from a live local.
            Errno::result(unsafe {
                libc::ioctl(
                    state.master,
                    libc::TIOCSPTLCK,
                    &unlock as *const libc::c_int,
                )
            })
            .map(drop)
        }
        Op::OpenPtySlave => {
            let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
            // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a new fd.
            let fd = Errno::result(unsafe { libc::ioctl(state.master, libc::TIOCGPTPEER, flags) })?;
            state.slave = above_stdio(fd)?;
            Ok(())
        }
        Op::SendPtyMaster => {
            send_fd(state.console, state.master)?;
            // The process must not keep the master (the init holds its fds until start).
            close(state.master);
            close(state.console);
            state.master = -1;
            state.console = -1;
            Ok(())
        }
        Op::TerminalStdio => {
            for target in 0..3 {
                // SAFETY: dup3 onto a stdio fd number in this child, which owns all its fds.
                Errno::result(unsafe { libc::dup3(state.slave, target, 0) })?;
            }
            close(state.slave);
            state.slave = -1;
            // SAFETY: TIOCSCTTY on fd 0, the pty slave, with argument 0 (do not steal); this
            // process leads a new session without a terminal (`Stdio` called setsid).
            Errno::result(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map(drop)
        }
        Op::AwaitStart => {
            report(state.status, READY, 0);
            let mut byte = [0u8; 1];
            // SAFETY: the start pipe's read end is open in this child.
            let start = unsafe { BorrowedFd::borrow_raw(state.start) };
            loop {
                match nix::unistd::read(start, &mut byte) {
                    Ok(1) => return Ok(()),
                    Err(Errno::EINTR) => continue,
                    // The container was deleted before it started.
                    _ => exit(0),
                }
            }
        }
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A raw `prctl` with two arguments (the rest zero).
fn prctl(option: libc::c_int, arg2: u64, arg3: u64) -> Result<(), Errno> {
    // SAFETY: the options used here take integers only.
    Errno::result(unsafe { libc::syscall(libc::SYS_prctl, option, arg2, arg3, 0u64, 0u64) })
        .map(drop)
}

fn touch(path: &CString) -> Result<(), Errno> {
    // SAFETY: open with a NUL-terminated path; the fd is closed right away.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just opened above and is closed once.
    unsafe { libc::close(fd) };
    Ok(())
}

fn stdio(fds: [RawFd; 3], console: RawFd, state: &mut State) -> Result<(), Errno> {
    // First copy every fd we keep above 5, so that placing them on 0..=5 clobbers none of them.
    let keep = [fds[0], fds[1], fds[2], state.status, state.start, console];
    let mut high = [-1; 6];
    for (slot, fd) in high.iter_mut().zip(keep) {
        if fd >= 0 {
            // SAFETY: F_DUPFD_CLOEXEC on an open fd of this child.
            *slot = Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 6) })?;
        }
    }
    for (target, fd) in high.iter().enumerate() {
        if *fd >= 0 {
            // Stdio is inherited by the program; the pipes and the socket stay close-on-exec.
            let flags = if target < 3 { 0 } else { libc::O_CLOEXEC };
            // SAFETY: dup3 onto a small fd number in this child, which owns all its fds.
            Errno::result(unsafe { libc::dup3(*fd, target as RawFd, flags) })?;
        } else if target < 3 {
            // The agent's own stdio is not the container's (a terminal replaces it later).
            close(target as RawFd);
        }
    }
    state.status = 3;
    state.start = if high[4] >= 0 { 4 } else { -1 };
    state.console = if high[5] >= 0 { 5 } else { -1 };
    // SAFETY: closes every fd above 5 of this child (the copies above, and whatever other
    // threads of the parent had open when it was cloned).
    Errno::result(unsafe { libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32) })?;
    setsid().map(drop)
}

fn close(fd: RawFd) {
    // SAFETY: closes an fd this child owns and no longer uses.
    unsafe { libc::close(fd) };
}

/// Moves a new fd off 0, 1 and 2 (closed while a terminal is set up), so that placing the pty
/// slave on them clobbers nothing; close-on-exec.
fn above_stdio(fd: RawFd) -> Result<RawFd, Errno> {
    if fd > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open fd of this child.
    let moved = Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) });
    close(fd);
    moved
}

/// An `SCM_RIGHTS` control message carrying one fd, laid out as `CMSG_SPACE(sizeof(int))`.
#[repr(C)]
struct FdControl {
    header: libc::cmsghdr,
    fd: libc::c_int,
}

// SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
const FD_SPACE: usize = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize;
// SAFETY: as above.
const FD_LEN: usize = unsafe { libc::CMSG_LEN(size_of::<libc::c_int>() as u32) } as usize;
const _: () = assert!(size_of::<FdControl>() == FD_SPACE);
const _: () = assert!(std::mem::offset_of!(FdControl, fd) + size_of::<libc::c_int>() == FD_LEN);

/// Sends `fd` with one byte over the stream socket `socket`; no allocation, a raw `sendmsg`.
fn send_fd(socket: RawFd, fd: RawFd) -> Result<(), Errno> {
    // SAFETY: all-zero is a valid cmsghdr and c_int (plain integers, and padding on some libcs).
    let mut control: FdControl = unsafe { std::mem::zeroed() };
    control.header.cmsg_len = FD_LEN as _;
    control.header.cmsg_level = libc::SOL_SOCKET;
    control.header.cmsg_type = libc::SCM_RIGHTS;
    control.fd = fd;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths); the pointers set below
    // point to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut control as *mut FdControl).cast();
    msg.msg_controllen = size_of::<FdControl>() as _;
    loop {
        // SAFETY: sendmsg reads the message, its one iovec and its control data, all live locals.
        match Errno::result(unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) }) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(Errno::EIO),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(errno),
        }
    }
}

/// `clone(2)` without a new stack (fork semantics). Returns 0 in the child and the child's pid
/// in the parent; with `pidfd`, the kernel stores a pidfd for the child there (`CLONE_PIDFD`).
///
/// # Safety
/// As `fork`: in a multi-threaded process the child may only make async-signal-safe calls.
pub(crate) unsafe fn clone(flags: u64, pidfd: Option<&mut libc::c_int>) -> Result<i32, Errno> {
    let mut flags = flags | libc::SIGCHLD as u64;
    let pidfd_ptr = match pidfd {
        Some(p) => {
            flags |= libc::CLONE_PIDFD as u64;
            p as *mut libc::c_int
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: a null stack gives fork semantics; the parent_tid slot (third argument on x86_64
    // and aarch64) receives the pidfd when CLONE_PIDFD is set and points to a live c_int.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            pidfd_ptr,
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        )
    };
    Errno::result(pid).map(|pid| pid as i32)
}

//! The crate's only raw system calls: TUN/TAP and interface ioctls.
//!
//! Each helper takes borrowed fds and plain values and returns `io::Result`, so the
//! `unsafe` stays here. Request numbers come from `libc`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{open, OFlag};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Opens `/dev/net/tun`, always close-on-exec.
pub fn open_tun(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlag::O_RDWR | OFlag::O_CLOEXEC;
    if nonblocking {
        flags |= OFlag::O_NONBLOCK;
    }
    Ok(open(TUN_PATH, flags, Mode::empty())?)
}

/// Opens a close-on-exec `AF_INET` datagram socket: the handle for interface ioctls
/// in the network namespace of the calling thread.
pub fn control_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn new_ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a byte array and a union of integers, arrays
    // and pointers) for which all-zero bytes is a valid value.
    let mut req: libc::ifreq = unsafe { MaybeUninit::zeroed().assume_init() };
    // Names are validated (at most IFNAMSIZ - 1 bytes) before reaching here; the
    // trailing NUL stays in place.
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, request, &mut ifreq)`.
fn ioctl_ifreq(fd: BorrowedFd<'_>, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the duration of the call and `req` points to
    // a valid, writable `ifreq`, which is what every request used with this helper
    // reads or writes (TUNSETIFF, TUNGETIFF, TUNSETQUEUE, SIOC[GS]IF*).
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) })?;
    Ok(())
}

/// `ioctl(fd, request, value)` for requests that take their argument by value
/// (TUNSETPERSIST, TUNSETOWNER, TUNSETGROUP, TUNSETOFFLOAD).
fn ioctl_value(fd: BorrowedFd<'_>, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests used with this helper read their argument as an integer and
    // dereference nothing; `fd` is live for the duration of the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, value) })?;
    Ok(())
}

/// `TUNGETFEATURES`: the `IFF_*` flags this kernel's TUN driver supports.
pub fn tun_get_features(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one `unsigned int` through the pointer, which points
    // to a live local; `fd` is live for the duration of the call.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNGETFEATURES,
            &mut features as *mut libc::c_uint,
        )
    })?;
    Ok(features)
}

/// `TUNSETIFF`: creates or attaches to the TAP `name` (or template); returns the
/// kernel's name for it.
pub fn tun_set_iff(fd: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> io::Result<String> {
    let mut req = new_ifreq(name);
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    ioctl_ifreq(fd, libc::TUNSETIFF, &mut req)?;
    Ok(ifreq_name(&req))
}

/// `TUNGETIFF`: the name and `IFF_*` flags of the device an fd is attached to.
pub fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<(String, libc::c_int)> {
    let mut req = new_ifreq("");
    ioctl_ifreq(fd, libc::TUNGETIFF, &mut req)?;
    // SAFETY: TUNGETIFF fills `ifru_flags`; every member of the zeroed union is valid.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((ifreq_name(&req), libc::c_int::from(flags as u16)))
}

/// `TUNSETQUEUE` with `IFF_ATTACH_QUEUE` or `IFF_DETACH_QUEUE`.
pub fn tun_set_queue(fd: BorrowedFd<'_>, attach: bool) -> io::Result<()> {
    let mut req = new_ifreq("");
    req.ifr_ifru.ifru_flags = if attach {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    } as libc::c_short;
    ioctl_ifreq(fd, libc::TUNSETQUEUE, &mut req)
}

/// `TUNSETVNETHDRSZ`.
pub fn tun_set_vnet_hdr_size(fd: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points to a
    // live local; `fd` is live for the duration of the call.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    })?;
    Ok(())
}

/// `TUNSETOFFLOAD` with a `TUN_F_*` mask.
pub fn tun_set_offload(fd: BorrowedFd<'_>, mask: libc::c_uint) -> io::Result<()> {
    ioctl_value(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(mask))
}

/// `TUNSETPERSIST`.
pub fn tun_set_persist(fd: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    ioctl_value(fd, libc::TUNSETPERSIST, libc::c_ulong::from(persist))
}

/// `TUNSETOWNER`.
pub fn tun_set_owner(fd: BorrowedFd<'_>, uid: libc::uid_t) -> io::Result<()> {
    ioctl_value(fd, libc::TUNSETOWNER, libc::c_ulong::from(uid))
}

/// `TUNSETGROUP`.
pub fn tun_set_group(fd: BorrowedFd<'_>, gid: libc::gid_t) -> io::Result<()> {
    ioctl_value(fd, libc::TUNSETGROUP, libc::c_ulong::from(gid))
}

/// `SIOCGIFINDEX`.
pub fn if_index(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut req = new_ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFINDEX, &mut req)?;
    // SAFETY: SIOCGIFINDEX fills `ifru_ifindex`; every member of the zeroed union is valid.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
}

/// `SIOCGIFFLAGS`.
pub fn if_flags(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut req = new_ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS fills `ifru_flags`; every member of the zeroed union is valid.
    Ok(u32::from(unsafe { req.ifr_ifru.ifru_flags } as u16))
}

/// `SIOCSIFFLAGS` (the low 16 bits; the kernel's ifreq carries no more).
pub fn if_set_flags(sock: BorrowedFd<'_>, name: &str, flags: u32) -> io::Result<()> {
    let mut req = new_ifreq(name);
    req.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// `SIOCGIFMTU`.
pub fn if_mtu(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut req = new_ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU fills `ifru_mtu`; every member of the zeroed union is valid.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// `SIOCSIFMTU`.
pub fn if_set_mtu(sock: BorrowedFd<'_>, name: &str, mtu: u32) -> io::Result<()> {
    let mtu = libc::c_int::try_from(mtu).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut req = new_ifreq(name);
    req.ifr_ifru.ifru_mtu = mtu;
    ioctl_ifreq(sock, libc::SIOCSIFMTU, &mut req)
}

/// `SIOCGIFHWADDR`.
pub fn if_hwaddr(sock: BorrowedFd<'_>, name: &str) -> io::Result<[u8; 6]> {
    let mut req = new_ifreq(name);
    ioctl_ifreq(sock, libc::SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR fills `ifru_hwaddr`; every member of the zeroed union is valid.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr }.sa_data;
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

/// `SIOCSIFHWADDR` for an Ethernet address.
pub fn if_set_hwaddr(sock: BorrowedFd<'_>, name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut req = new_ifreq(name);
    // SAFETY: a zeroed `sockaddr` is valid.
    let mut addr: libc::sockaddr = unsafe { MaybeUninit::zeroed().assume_init() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in addr.sa_data.iter_mut().zip(mac.iter()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    ioctl_ifreq(sock, libc::SIOCSIFHWADDR, &mut req)
}

/// Marks every fd from `first` up as close-on-exec, for a `pre_exec` hook: no
/// allocation, one system call (`close_range` with `CLOSE_RANGE_CLOEXEC`, Linux 5.11).
pub fn cloexec_from(first: libc::c_uint) -> io::Result<()> {
    // SAFETY: close_range takes three integers and touches only this process's fd table;
    // with CLOSE_RANGE_CLOEXEC it closes nothing, it sets FD_CLOEXEC.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

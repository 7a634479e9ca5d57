//! `sandbox check`: can this host run a sandbox with this configuration?
//!
//! One line per check, `PASS`, `WARN` (optional, missing) or `FAIL` (required, missing),
//! and an error at the end when a required check failed. With a configuration, the QEMU
//! backend's confinement gets a line each: `seccomp`, `rootless`, `chroot`, PASS when
//! configured and workable here, WARN when off, FAIL when configured but impossible here (a
//! QEMU that refuses the `-sandbox` value, a user that does not exist, a kernel it cannot
//! read, a QEMU without `-chroot`).

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use hypervisor::Accelerator;

use crate::backend::{self, BackendKind};
use crate::config;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Present and usable.
    Pass,
    /// Optional and missing: the sandbox runs without it.
    Warn,
    /// Required and missing.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CheckLine {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub status: Status,
    /// What was found.
    pub detail: String,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        write!(f, "{s}  {:<12} {}", self.name, self.detail)
    }
}

fn line(name: &str, status: Status, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        name: name.to_string(),
        status,
        detail: detail.into(),
    }
}

fn required(name: &str, ok: bool, detail: impl Into<String>) -> CheckLine {
    line(name, if ok { Status::Pass } else { Status::Fail }, detail)
}

/// Runs every check; `config` adds the backend's and the guest assets' checks.
pub fn run(config_file: Option<&Path>) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    out.push(required(
        "root",
        uid == Some(0),
        match uid {
            Some(0) => "running as root (namespaces and TAPs need it)".to_string(),
            Some(u) => {
                format!("running as uid {u}: `sandbox run` needs root for namespaces and TAPs")
            }
            None => "cannot tell the uid (/proc not mounted?)".to_string(),
        },
    ));
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    out.push(required(
        "tun",
        tun.is_ok(),
        match tun {
            Ok(_) => "/dev/net/tun opens read-write".to_string(),
            Err(e) => format!("/dev/net/tun: {e} (load the tun module)"),
        },
    ));

    let mut confinement = Vec::new();
    let (kind, wanted, binary, assets) = match config_file {
        Some(file) => match config::load(file) {
            Ok(c) => {
                out.push(line(
                    "config",
                    Status::Pass,
                    format!(
                        "{}: hypervisor {}, {} key(s) ignored{}",
                        file.display(),
                        c.backend,
                        c.warnings.len(),
                        if c.warnings.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({})",
                                c.warnings
                                    .iter()
                                    .map(|w| format!("{} line {}", w.key, w.line))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                ));
                let h = c.hypervisor;
                confinement = backend::confinement(c.backend, &h);
                let mut assets = vec![("kernel", h.kernel.clone())];
                assets.extend(h.initrd.clone().map(|p| ("initrd", p)));
                assets.extend(h.image.clone().map(|p| ("image", p)));
                (vec![c.backend], h.accelerator, h.path, assets)
            }
            Err(e) => {
                out.push(line("config", Status::Fail, e.to_string()));
                return out;
            }
        },
        None => (backend::compiled(), Accelerator::Auto, None, Vec::new()),
    };

    for kind in kind {
        backend_lines(&mut out, kind, wanted, binary.as_deref());
    }
    // Which confinement QEMU gets: active (PASS), off (WARN), or configured but impossible
    // here (FAIL, with the reason).
    for c in confinement {
        let status = match c.works {
            Some(true) => Status::Pass,
            None => Status::Warn,
            Some(false) => Status::Fail,
        };
        out.push(line(c.name, status, c.detail));
    }
    for (name, path) in assets {
        out.push(match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => line(
                name,
                Status::Pass,
                format!("{} ({:.1} MB)", path.display(), m.len() as f64 / 1e6),
            ),
            Ok(_) => line(
                name,
                Status::Fail,
                format!("{} is not a file", path.display()),
            ),
            Err(e) => line(
                name,
                Status::Fail,
                format!("{}: {e} (run `make guest-assets`)", path.display()),
            ),
        });
    }
    out
}

fn backend_lines(
    out: &mut Vec<CheckLine>,
    kind: BackendKind,
    wanted: Accelerator,
    binary: Option<&Path>,
) {
    let probe = match backend::probe_host(kind, wanted, binary) {
        Ok(p) => {
            out.push(line(
                "backend",
                Status::Pass,
                format!(
                    "{kind}: compiled in ({})",
                    if p.in_process {
                        "in-process VMM"
                    } else {
                        "VMM as a child process"
                    }
                ),
            ));
            p
        }
        Err(e) => {
            out.push(line("backend", Status::Fail, e.to_string()));
            return;
        }
    };
    out.push(match (&probe.accelerator, &probe.kvm_caveat) {
        (Ok((accel, why)), Some(caveat)) if accel == "kvm" => {
            line("kvm", Status::Warn, format!("usable: {why}; but {caveat}"))
        }
        (Ok((accel, why)), None) if accel == "kvm" => {
            line("kvm", Status::Pass, format!("usable: {why}"))
        }
        (Ok((accel, why)), _) => line(
            "kvm",
            Status::Warn,
            format!("not used, {accel} instead ({why}); guests boot slower"),
        ),
        (Err(e), _) => line("kvm", Status::Fail, e.clone()),
    });
    if let Some(bin) = &probe.vmm_binary {
        out.push(match Command::new(bin).arg("--version").output() {
            Ok(o) if o.status.success() => line(
                "vmm binary",
                Status::Pass,
                format!(
                    "{}: {}",
                    bin.display(),
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                ),
            ),
            Ok(o) => line(
                "vmm binary",
                Status::Fail,
                format!("{} --version failed: {}", bin.display(), o.status),
            ),
            Err(e) => line(
                "vmm binary",
                Status::Fail,
                format!(
                    "{}: {e} (install qemu-system-x86: `make deps`)",
                    bin.display()
                ),
            ),
        });
    }
    let optional = |name: &str, present: Option<bool>, without: &str| {
        present.map(|p| {
            if p {
                line(name, Status::Pass, format!("/dev/{name} opens read-write"))
            } else {
                line(
                    name,
                    Status::Warn,
                    format!("/dev/{name} is not usable: {without}"),
                )
            }
        })
    };
    out.extend(optional(
        "vhost-net",
        probe.vhost_net,
        "virtio-net runs in the VMM's userspace",
    ));
    out.extend(optional(
        "vhost-vsock",
        probe.vhost_vsock,
        "the agent is reached over virtio-serial",
    ));
}

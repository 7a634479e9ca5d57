//! The command line containerd gives a shim: Go-style single-dash flags and an action.
//!
//! containerd 1.6 runs `containerd-shim-kata-v2 -namespace NS -address A -publish-binary B
//! -id ID [-debug] start` (and `... -bundle B delete`) in the bundle directory; the daemon
//! that `start` spawns gets the same flags and no action.

use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::{anyhow, Result};

/// What containerd passed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flags {
    /// containerd namespace of the task (`default`, `k8s.io`...).
    pub namespace: String,
    /// Task (container) id.
    pub id: String,
    /// containerd's gRPC address: part of the shim socket's name.
    pub address: String,
    /// The binary containerd publishes events with (unused: events go over ttrpc).
    pub publish_binary: String,
    /// Bundle directory, when not the working directory.
    pub bundle: String,
    /// The socket the daemon serves (given to the daemon by `start`, removed at its end).
    pub socket: String,
    /// Log at debug level.
    pub debug: bool,
    /// `start`, `delete`, or empty for the daemon.
    pub action: String,
    /// `-v`/`-version`: print the version.
    pub version: bool,
}

impl Flags {
    /// The bundle directory: `-bundle`, or the working directory containerd runs us in.
    pub fn bundle(&self) -> Result<PathBuf> {
        if !self.bundle.is_empty() {
            return Ok(PathBuf::from(&self.bundle));
        }
        std::env::current_dir()
            .map_err(|e| anyhow!("Reading the working directory (the bundle): {e}"))
    }

    /// The flags of the daemon `start` spawns: these, without the action.
    pub fn daemon_args(&self) -> Vec<String> {
        let mut args = vec![
            "-namespace".to_string(),
            self.namespace.clone(),
            "-id".to_string(),
            self.id.clone(),
            "-address".to_string(),
            self.address.clone(),
            "-publish-binary".to_string(),
            self.publish_binary.clone(),
        ];
        if !self.socket.is_empty() {
            args.extend(["-socket".to_string(), self.socket.clone()]);
        }
        if self.debug {
            args.push("-debug".to_string());
        }
        args
    }
}

/// Parses `args` (without the program name).
pub fn parse<S: AsRef<OsStr>>(args: &[S]) -> Result<Flags> {
    let mut f = Flags::default();
    let (mut v, mut version, mut info) = (false, false, false);
    let rest: Vec<String> = go_flag::parse_args(args, |p| {
        p.add_flag("namespace", &mut f.namespace);
        p.add_flag("id", &mut f.id);
        p.add_flag("address", &mut f.address);
        p.add_flag("publish-binary", &mut f.publish_binary);
        p.add_flag("bundle", &mut f.bundle);
        p.add_flag("debug", &mut f.debug);
        p.add_flag("socket", &mut f.socket);
        p.add_flag("info", &mut info);
        p.add_flag("v", &mut v);
        p.add_flag("version", &mut version);
    })
    .map_err(|e| anyhow!("Reading containerd's flags: {e}"))?;
    f.version = v || version;
    if let Some(action) = rest.first() {
        f.action = action.clone();
    }
    Ok(f)
}

/// Whether `args` (with the program name) is containerd's command line rather than an
/// operator's: Go-style single-dash long flags, which the operator CLI never takes.
pub fn is_containerd_invocation(args: &[String]) -> bool {
    args.iter().skip(1).any(|a| {
        a.len() > 2
            && a.starts_with('-')
            && !a.starts_with("--")
            && a[1..].chars().all(|c| c.is_ascii_alphabetic() || c == '-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn containerd_style_flags_are_recognized() {
        assert!(is_containerd_invocation(&argv(
            "shim -namespace k8s.io -address /run/c.sock -id x start"
        )));
        assert!(!is_containerd_invocation(&argv(
            "shim sandbox run -c f.toml"
        )));
        assert!(!is_containerd_invocation(&argv("shim --version")));
    }

    #[test]
    fn start_and_delete_lines_parse() {
        let f = parse(&argv(
            "-namespace default -address /tmp/c.sock -publish-binary /usr/bin/containerd -id web -debug start",
        ))
        .unwrap();
        assert_eq!(
            (f.namespace.as_str(), f.id.as_str(), f.action.as_str()),
            ("default", "web", "start")
        );
        assert!(f.debug);
        let d = parse(&argv("-namespace n -id web -bundle /b delete")).unwrap();
        assert_eq!((d.bundle.as_str(), d.action.as_str()), ("/b", "delete"));
        let daemon = parse(&f.daemon_args()).unwrap();
        assert_eq!(daemon.action, "");
        assert_eq!(daemon.address, "/tmp/c.sock");
    }

    #[test]
    fn unknown_flags_are_an_error() {
        assert!(parse(&argv("-frobnicate 1 start")).is_err());
    }
}

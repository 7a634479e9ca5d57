//! The shim's logger: readable lines or JSON on stderr, filtered by level, written by a
//! background thread (`slog-async`) so logging never blocks the sandbox.

use slog::Drain;

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per record.
    Text,
    /// One JSON object per line (Kata's convention).
    Json,
}

/// Lowest level written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// Progress of each step (default).
    Info,
    /// Details for debugging (QEMU command lines, QMP).
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    fn slog(self) -> slog::Level {
        match self {
            LogLevel::Error => slog::Level::Error,
            LogLevel::Warn => slog::Level::Warning,
            LogLevel::Info => slog::Level::Info,
            LogLevel::Debug => slog::Level::Debug,
            LogLevel::Trace => slog::Level::Trace,
        }
    }
}

/// The root logger and the guard that flushes it when dropped.
pub fn init(format: LogFormat, level: LogLevel) -> (slog::Logger, slog_async::AsyncGuard) {
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match format {
        LogFormat::Text => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => Box::new(
            slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse(),
        ),
    };
    let drain = drain.filter_level(level.slog()).fuse();
    root(drain)
}

/// The logger of the shim daemon containerd starts: logfmt lines (`time="..." level=info
/// msg="..." key=value`, containerd's own format) on the `log` FIFO containerd reads in the
/// bundle directory and copies to its log. Without a reader (no containerd), records are
/// dropped. A write that fails (containerd restarted) drops the record, never the shim.
pub fn fifo(path: &std::path::Path, level: LogLevel) -> (slog::Logger, slog_async::AsyncGuard) {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .and_then(|f| {
            // Non-blocking only to open without a reader; writes then wait for room.
            let flags = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFL)?;
            let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
            flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
            nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(flags))?;
            Ok(f)
        });
    let writer: Box<dyn std::io::Write + Send> = match file {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(std::io::sink()),
    };
    let drain = slog_logfmt::Logfmt::new(writer)
        .set_prefix(logfmt_prefix)
        .print_msg(true)
        .build()
        .ignore_res()
        .filter_level(level.slog())
        .fuse();
    root(drain)
}

/// The root logger over `drain`, written by a background thread, with the shim's keys.
fn root<D>(drain: D) -> (slog::Logger, slog_async::AsyncGuard)
where
    D: Drain<Ok = (), Err = slog::Never> + Send + 'static,
{
    let (drain, guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .build_with_guard();
    let log = slog::Logger::root(
        drain.fuse(),
        slog::o!("source" => "containerd-shim-kata-v2", "pid" => std::process::id()),
    );
    (log, guard)
}

/// `time="RFC 3339" level=LEVEL ` in logrus's words.
fn logfmt_prefix(w: &mut dyn std::io::Write, record: &slog::Record) -> slog::Result {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let level = match record.level() {
        slog::Level::Critical => "fatal",
        slog::Level::Error => "error",
        slog::Level::Warning => "warning",
        slog::Level::Info => "info",
        slog::Level::Debug => "debug",
        slog::Level::Trace => "trace",
    };
    write!(w, "time=\"{now}\" level={level} ")?;
    Ok(())
}

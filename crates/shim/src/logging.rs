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
    let (drain, guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .build_with_guard();
    let log = slog::Logger::root(
        drain.fuse(),
        slog::o!("source" => "containerd-shim-kata-v2", "pid" => std::process::id()),
    );
    (log, guard)
}

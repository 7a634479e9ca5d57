//! Kata's `configuration.toml`, the subset this shim reads (see `CONFIG.md`).
//!
//! The file is parsed with spans, so every warning and error names the file, the line and
//! the key. Unknown keys and tables are warnings (a full Kata configuration loads, with its
//! unsupported knobs listed); values of known keys that are wrong are errors.
//!
//! Paths may use `${NAME}`: `${CONFIG_DIR}` is the directory of the configuration file, any
//! other name is an environment variable (`${GUEST_DIR}`). After expansion a path must be
//! absolute, as in Kata.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use hypervisor::config::{MAX_VCPUS, MIN_MEMORY_MIB};
use hypervisor::device::MAX_QUEUE_PAIRS;
use hypervisor::{Accelerator, AgentChannelKind, HypervisorConfig, SharedFsCache, SharedFsKind};
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::backend::BackendKind;

/// A configuration file, loaded and checked.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The file it came from.
    pub file: PathBuf,
    /// The chosen backend.
    pub backend: BackendKind,
    /// The VM's configuration.
    pub hypervisor: HypervisorConfig,
    /// VM templates (`[factory]`).
    pub factory: Factory,
    /// Keys and tables this shim does not know; they were ignored.
    pub warnings: Vec<ConfigWarning>,
}

/// Kata's `[factory]`: sandboxes started from a VM template (booted once, saved, restored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Factory {
    /// `enable_template`: start sandboxes from a template of their configuration.
    pub enable_template: bool,
    /// `template_path`: where templates are kept (best on tmpfs: their memory files are
    /// mapped by every clone).
    pub template_path: PathBuf,
}

/// Kata's default `template_path`.
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";

impl Default for Factory {
    fn default() -> Self {
        Factory {
            enable_template: false,
            template_path: PathBuf::from(DEFAULT_TEMPLATE_PATH),
        }
    }
}

/// A key that was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The file.
    pub file: PathBuf,
    /// 1-based line of the key.
    pub line: usize,
    /// Dotted key (`hypervisor.qemu.enable_iommu`).
    pub key: String,
    /// Why it was ignored.
    pub reason: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.key,
            self.reason
        )
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("Reading configuration file {}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}: not valid TOML: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A known key has a bad value.
    #[error("{}:{line}: {key}: {problem}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the value.
        line: usize,
        /// Dotted key.
        key: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The file does not say which hypervisor to use.
    #[error("{}: {problem}", file.display())]
    NoHypervisor {
        /// The file.
        file: PathBuf,
        /// What is missing.
        problem: String,
    },
}

/// Reads and checks `file`, taking `${NAME}` values from the process environment.
pub fn load(file: &Path) -> Result<ShimConfig, ConfigFileError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigFileError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse(file, &text, &|name| std::env::var(name).ok())
}

/// Parses `text` as if read from `file`; `env` resolves `${NAME}` in paths.
pub fn parse(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShimConfig, ConfigFileError> {
    let doc = ImDocument::parse(text).map_err(|e| ConfigFileError::Syntax {
        file: file.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_string(),
    })?;
    let cx = Cx {
        file,
        text,
        config_dir: file
            .parent()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()))
            .unwrap_or_default(),
        env,
    };
    let mut warnings = Vec::new();
    let root = doc.as_table();

    let mut hypervisors: Vec<(String, &dyn TableLike, Option<Range<usize>>)> = Vec::new();
    let mut runtime_choice: Option<(String, Option<Range<usize>>)> = None;
    let mut factory = Factory::default();
    for (key, item) in root.iter() {
        let span = root.get_key_value(key).and_then(|(k, _)| k.span());
        match key {
            "hypervisor" => {
                let table = cx.table(key, item, span.clone())?;
                for (name, hv) in table.iter() {
                    let hv_span = table.get_key_value(name).and_then(|(k, _)| k.span());
                    let dotted = format!("hypervisor.{name}");
                    let t = cx.table(&dotted, hv, hv_span.clone())?;
                    hypervisors.push((name.to_string(), t, hv_span));
                }
            }
            "runtime" => {
                let table = cx.table(key, item, span.clone())?;
                for (k, v) in table.iter() {
                    let kspan = table.get_key_value(k).and_then(|(k, _)| k.span());
                    if k == "hypervisor_name" {
                        let name = cx.string("runtime.hypervisor_name", v)?;
                        runtime_choice = Some((name, v.span().or(kspan)));
                    } else {
                        warnings.push(cx.warning(
                            &format!("runtime.{k}"),
                            kspan,
                            "unknown key, ignored",
                        ));
                    }
                }
            }
            "factory" => {
                let table = cx.table(key, item, span.clone())?;
                for (k, v) in table.iter() {
                    let kspan = table.get_key_value(k).and_then(|(k, _)| k.span());
                    match k {
                        "enable_template" => {
                            factory.enable_template = cx.bool("factory.enable_template", v)?
                        }
                        "template_path" => {
                            factory.template_path = cx.path("factory.template_path", v)?
                        }
                        _ => warnings.push(cx.warning(
                            &format!("factory.{k}"),
                            kspan,
                            "unknown key, ignored",
                        )),
                    }
                }
            }
            _ => warnings.push(cx.warning(key, span, "unknown table or key, ignored")),
        }
    }

    let (name, table) = match runtime_choice {
        Some((name, span)) => {
            let Some((_, t, _)) = hypervisors.iter().find(|(n, _, _)| *n == name) else {
                return Err(cx.invalid(
                    "runtime.hypervisor_name",
                    span,
                    format!("{name:?} has no [hypervisor.{name}] table in this file"),
                ));
            };
            (name, *t)
        }
        None => match hypervisors.as_slice() {
            [(name, t, _)] => (name.clone(), *t),
            [] => return Err(ConfigFileError::NoHypervisor {
                file: file.to_path_buf(),
                problem:
                    "no [hypervisor.NAME] table: add [hypervisor.qemu] or [hypervisor.dragonball]"
                        .into(),
            }),
            many => {
                let names: Vec<_> = many.iter().map(|(n, _, _)| n.as_str()).collect();
                return Err(ConfigFileError::NoHypervisor {
                    file: file.to_path_buf(),
                    problem: format!(
                        "several hypervisor tables ({}): choose one with [runtime] hypervisor_name",
                        names.join(", ")
                    ),
                });
            }
        },
    };
    let hv_span = hypervisors
        .iter()
        .find(|(n, _, _)| *n == name)
        .and_then(|(_, _, s)| s.clone());
    let backend = BackendKind::parse(&name).ok_or_else(|| {
        cx.invalid(
            &format!("hypervisor.{name}"),
            hv_span.clone(),
            format!(
                "{name:?} is not a hypervisor this shim knows; use {}",
                BackendKind::ALL
                    .iter()
                    .map(|b| format!("{:?}", b.name()))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        )
    })?;
    for (other, _, span) in &hypervisors {
        if *other != name {
            warnings.push(cx.warning(
                &format!("hypervisor.{other}"),
                span.clone(),
                &format!("not the chosen hypervisor ({name}), ignored"),
            ));
        }
    }
    let hypervisor = cx.hypervisor(&name, table, hv_span, &mut warnings)?;
    Ok(ShimConfig {
        file: file.to_path_buf(),
        backend,
        hypervisor,
        factory,
        warnings,
    })
}

/// The 1-based line holding byte `offset` of `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Parsing context: the file, its text (for line numbers) and path expansion.
struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    config_dir: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Cx<'a> {
    fn line(&self, span: Option<Range<usize>>) -> usize {
        span.map(|s| line_of(self.text, s.start)).unwrap_or(1)
    }

    fn invalid(
        &self,
        key: &str,
        span: Option<Range<usize>>,
        problem: impl Into<String>,
    ) -> ConfigFileError {
        ConfigFileError::Invalid {
            file: self.file.to_path_buf(),
            line: self.line(span),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn warning(&self, key: &str, span: Option<Range<usize>>, reason: &str) -> ConfigWarning {
        ConfigWarning {
            file: self.file.to_path_buf(),
            line: self.line(span),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn table<'i>(
        &self,
        key: &str,
        item: &'i Item,
        span: Option<Range<usize>>,
    ) -> Result<&'i dyn TableLike, ConfigFileError> {
        item.as_table_like()
            .ok_or_else(|| self.invalid(key, item.span().or(span), "must be a table"))
    }

    fn value<'i>(&self, key: &str, item: &'i Item) -> Result<&'i Value, ConfigFileError> {
        item.as_value()
            .ok_or_else(|| self.invalid(key, item.span(), "must be a value, not a table"))
    }

    fn string(&self, key: &str, item: &Item) -> Result<String, ConfigFileError> {
        let v = self.value(key, item)?;
        v.as_str().map(str::to_string).ok_or_else(|| {
            self.invalid(
                key,
                v.span(),
                format!("must be a string, not {}", v.type_name()),
            )
        })
    }

    fn bool(&self, key: &str, item: &Item) -> Result<bool, ConfigFileError> {
        let v = self.value(key, item)?;
        v.as_bool().ok_or_else(|| {
            self.invalid(
                key,
                v.span(),
                format!("must be true or false, not {}", v.type_name()),
            )
        })
    }

    fn int(&self, key: &str, item: &Item, min: i64, max: i64) -> Result<i64, ConfigFileError> {
        let v = self.value(key, item)?;
        let n = v.as_integer().ok_or_else(|| {
            self.invalid(
                key,
                v.span(),
                format!("must be an integer, not {}", v.type_name()),
            )
        })?;
        if n < min || n > max {
            return Err(self.invalid(
                key,
                v.span(),
                format!("{n} is out of range: use {min} to {max}"),
            ));
        }
        Ok(n)
    }

    fn path(&self, key: &str, item: &Item) -> Result<PathBuf, ConfigFileError> {
        let raw = self.string(key, item)?;
        let span = item.span();
        let expanded = expand(&raw, &self.config_dir, self.env)
            .map_err(|problem| self.invalid(key, span.clone(), problem))?;
        let path = PathBuf::from(&expanded);
        if expanded.is_empty() {
            return Err(self.invalid(key, span, "is empty; give an absolute path"));
        }
        if !path.is_absolute() {
            return Err(self.invalid(
                key,
                span,
                format!(
                    "{expanded:?} is not an absolute path; write it in full, or start it with ${{CONFIG_DIR}} or an environment variable such as ${{GUEST_DIR}}"
                ),
            ));
        }
        Ok(path)
    }

    fn hypervisor(
        &self,
        name: &str,
        table: &dyn TableLike,
        table_span: Option<Range<usize>>,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<HypervisorConfig, ConfigFileError> {
        let mut c = HypervisorConfig::default();
        let mut kernel_seen = false;
        for (k, item) in table.iter() {
            let key = format!("hypervisor.{name}.{k}");
            let kspan = table.get_key_value(k).and_then(|(k, _)| k.span());
            match k {
                "path" => c.path = Some(self.path(&key, item)?),
                "kernel" => {
                    c.kernel = self.path(&key, item)?;
                    kernel_seen = true;
                }
                "initrd" => c.initrd = Some(self.path(&key, item)?),
                "image" => c.image = Some(self.path(&key, item)?),
                "kernel_params" => {
                    c.kernel_params = self
                        .string(&key, item)?
                        .split_whitespace()
                        .map(str::to_string)
                        .collect();
                }
                "machine_type" => {
                    let m = self.string(&key, item)?;
                    c.machine_type = (!m.is_empty()).then_some(m);
                }
                "default_vcpus" => {
                    c.vcpus = self.int(&key, item, 1, i64::from(MAX_VCPUS))? as u32;
                }
                "default_memory" => {
                    c.memory_mib =
                        self.int(&key, item, i64::from(MIN_MEMORY_MIB), 1 << 20)? as u32;
                }
                "disable_vhost_net" => c.disable_vhost_net = self.bool(&key, item)?,
                "reclaim_guest_freed_memory" => {
                    c.reclaim_guest_freed_memory = self.bool(&key, item)?
                }
                "network_queues" => {
                    c.network_queues = self.int(&key, item, 1, i64::from(MAX_QUEUE_PAIRS))? as u16;
                }
                "accelerator" => {
                    c.accelerator = match self.string(&key, item)?.as_str() {
                        "" | "auto" => Accelerator::Auto,
                        "kvm" => Accelerator::Kvm,
                        "tcg" => Accelerator::Tcg,
                        other => {
                            return Err(self.invalid(
                                &key,
                                item.span(),
                                format!("{other:?} is not an accelerator: use \"auto\", \"kvm\" or \"tcg\""),
                            ))
                        }
                    }
                }
                "agent_channel" => {
                    c.agent_channel = match self.string(&key, item)?.as_str() {
                        "" | "auto" => AgentChannelKind::Auto,
                        "vsock" => AgentChannelKind::Vsock,
                        "virtio_serial" | "virtio-serial" => AgentChannelKind::VirtioSerial,
                        other => {
                            return Err(self.invalid(
                                &key,
                                item.span(),
                                format!("{other:?} is not an agent channel: use \"auto\", \"vsock\" or \"virtio_serial\""),
                            ))
                        }
                    }
                }
                "agent_port" => {
                    c.agent_port = self.int(&key, item, 1, i64::from(u32::MAX) - 1)? as u32;
                }
                "seccompsandbox" => {
                    let v = self.string(&key, item)?;
                    if !v.is_empty() {
                        hypervisor::config::check_seccomp_sandbox(&v)
                            .map_err(|e| self.invalid(&key, item.span(), e.problem))?;
                    }
                    // Kata: an empty value runs QEMU without a filter.
                    c.seccomp_sandbox = (!v.is_empty()).then_some(v);
                }
                "rootless" => c.rootless = self.bool(&key, item)?,
                "rootless_user" => {
                    let v = self.string(&key, item)?;
                    hypervisor::config::RootlessUser::parse(&v)
                        .map_err(|e| self.invalid(&key, item.span(), e.problem))?;
                    c.rootless_user = v;
                }
                "chroot" => c.chroot = self.bool(&key, item)?,
                "shared_fs" => {
                    c.shared_fs = match self.string(&key, item)?.as_str() {
                        "none" | "" => SharedFsKind::None,
                        "virtio-fs" => SharedFsKind::VirtioFs,
                        other => {
                            return Err(self.invalid(
                                &key,
                                item.span(),
                                format!("{other:?} is not supported: use \"virtio-fs\" or \"none\""),
                            ))
                        }
                    }
                }
                "virtio_fs_daemon" => c.virtio_fs_daemon = Some(self.path(&key, item)?),
                "virtio_fs_extra_args" => {
                    let v = self.value(&key, item)?;
                    let bad = || self.invalid(&key, v.span(), "must be an array of strings");
                    c.virtio_fs_extra_args = v
                        .as_array()
                        .ok_or_else(bad)?
                        .iter()
                        .map(|a| a.as_str().map(str::to_string).ok_or_else(bad))
                        .collect::<Result<_, _>>()?;
                }
                "virtio_fs_cache" => {
                    c.virtio_fs_cache = self
                        .string(&key, item)?
                        .parse::<SharedFsCache>()
                        .map_err(|e| self.invalid(&key, item.span(), e.problem))?;
                }
                _ => warnings.push(self.warning(&key, kspan, "unknown key, ignored")),
            }
        }
        if !kernel_seen {
            return Err(self.invalid(
                &format!("hypervisor.{name}.kernel"),
                table_span.clone(),
                "is missing: give the guest kernel's absolute path",
            ));
        }
        // The checks above cover every field; this one guards against drift with the
        // library's own rules.
        c.validate()
            .map_err(|e| self.invalid(&format!("hypervisor.{name}"), table_span, e.to_string()))?;
        Ok(c)
    }
}

/// Expands `${NAME}` in `raw`: `CONFIG_DIR` is `config_dir`, other names come from `env`.
/// `$` not followed by `{` is kept as is.
pub fn expand(
    raw: &str,
    config_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{raw:?} has an unclosed ${{"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{raw:?}: ${{{name}}} is not a variable name (letters, digits, '_')"
            ));
        }
        if name == "CONFIG_DIR" {
            out.push_str(&config_dir.to_string_lossy());
        } else {
            let value = env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("{raw:?} uses ${{{name}}}, which is not set in the environment")
            })?;
            out.push_str(&value);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

//! Which configuration file a containerd-started shim reads, found as Kata finds it: the
//! runtime options' `ConfigPath` (CRI's `[...runtimes.kata.options] ConfigPath = "..."`), then
//! `KATA_CONF_FILE`, then `/etc/kata-containers/configuration.toml`, then the shipped default
//! `/usr/share/defaults/kata-containers/configuration.toml` (where `make install` puts it).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::{Message, UnknownValueRef};

/// The administrator's configuration.
pub const ETC_CONFIG: &str = "/etc/kata-containers/configuration.toml";
/// The shipped default.
pub const DEFAULT_CONFIG: &str = "/usr/share/defaults/kata-containers/configuration.toml";
/// The environment variable naming a configuration file.
pub const ENV_CONFIG: &str = "KATA_CONF_FILE";

/// The configuration file to read: see the module docs. `options` is the Create request's.
pub fn find(options: Option<&Any>) -> Result<PathBuf> {
    if let Some(path) = options.map(config_path).transpose()?.flatten() {
        return Ok(path);
    }
    if let Some(env) = std::env::var_os(ENV_CONFIG).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(env));
    }
    for candidate in [ETC_CONFIG, DEFAULT_CONFIG] {
        if Path::new(candidate).exists() {
            return Ok(PathBuf::from(candidate));
        }
    }
    Err(anyhow!(
        "no configuration found: set ConfigPath in the runtime's options, or {ENV_CONFIG}, or install one at {ETC_CONFIG} or {DEFAULT_CONFIG} (make install)"
    ))
}

/// `ConfigPath` of CRI's runtime options (`runtimeoptions.v1.Options`: `type_url` = 1,
/// `config_path` = 2), when the options are of that type and set it.
fn config_path(any: &Any) -> Result<Option<PathBuf>> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    // No generated type for it: its fields are read as the unknown fields of an empty message.
    let message = Empty::parse_from_bytes(&any.value)
        .context("Reading the runtime options (runtimeoptions.v1.Options)")?;
    let path = match message.special_fields.unknown_fields().get(2) {
        Some(UnknownValueRef::LengthDelimited(bytes)) => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        _ => None,
    };
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_options_name_the_file() {
        // type_url (1) "x", config_path (2) "/etc/k.toml"
        let mut value = vec![0x0a, 1, b'x', 0x12, 11];
        value.extend_from_slice(b"/etc/k.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path(&any).unwrap(),
            Some(PathBuf::from("/etc/k.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'y'],
            ..Default::default()
        };
        assert_eq!(config_path(&other).unwrap(), None);
    }
}

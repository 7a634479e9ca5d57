//! Parsing OCI documents strictly: `oci-spec` ignores fields it does not know, so
//! the text is compared with what the typed value serializes back to, and a field
//! that did not survive is an error naming it (`process.foo`, `mounts[2].bar`).

use oci_spec::runtime::{Process, Spec};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Parses `config.json` text.
pub fn parse_spec(text: &str) -> Result<Spec, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("The OCI spec is not JSON: {e}"))?;
    strict("OCI spec", value)
}

/// Parses an OCI `process` object.
pub fn parse_process(value: Value) -> Result<Process, String> {
    strict("OCI process", value)
}

fn strict<T: DeserializeOwned + Serialize>(what: &str, value: Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone())
        .map_err(|e| format!("The {what} is not valid: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("Re-encoding the {what}: {e}"))?;
    let mut unknown = Vec::new();
    unknown_fields(&value, &back, "", &mut unknown);
    match unknown.as_slice() {
        [] => Ok(typed),
        [one] => Err(format!("The {what} has an unknown field: {one}")),
        many => Err(format!(
            "The {what} has unknown fields: {}",
            many.join(", ")
        )),
    }
}

/// Collects the paths of keys of `original` that `typed` lacks. A `null` is no field.
fn unknown_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(fields), Value::Object(known)) => {
            for (key, value) in fields {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    Some(typed) => unknown_fields(value, typed, &here, out),
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(items), Value::Array(known)) => {
            for (index, (item, typed)) in items.iter().zip(known).enumerate() {
                unknown_fields(item, typed, &format!("{path}[{index}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["sh"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "hostname": "c1",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "annotations": {"any.key": "kept"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    }"#;

    #[test]
    fn a_known_spec_parses() {
        let spec = parse_spec(SPEC).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("c1"));
    }

    #[test]
    fn unknown_fields_are_named_with_their_path() {
        let text = SPEC
            .replace("\"cwd\": \"/\"", "\"cwd\": \"/\", \"bogus\": 1")
            .replace(
                "\"source\": \"proc\"",
                "\"source\": \"proc\", \"extra\": true",
            );
        let error = parse_spec(&text).unwrap_err();
        assert_eq!(
            error,
            "The OCI spec has unknown fields: mounts[0].extra, process.bogus"
        );
        let error = parse_spec(&SPEC.replace("\"hostname\"", "\"hostnam\"")).unwrap_err();
        assert_eq!(error, "The OCI spec has an unknown field: hostnam");
    }

    #[test]
    fn a_process_is_checked_too_and_bad_json_is_named() {
        let process = serde_json::json!({"args": ["ps"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                                         "colour": "red"});
        assert_eq!(
            parse_process(process).unwrap_err(),
            "The OCI process has an unknown field: colour"
        );
        assert!(parse_spec("{")
            .unwrap_err()
            .starts_with("The OCI spec is not JSON"));
    }
}

//! Interface name checks, done before any system call.

use crate::{Error, Result};

/// The longest interface name the kernel accepts (`IFNAMSIZ` minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Checks an interface name or a kernel template (`tap%d`).
///
/// Returns whether `name` is a template. The rules are the kernel's (`dev_valid_name`
/// and `dev_alloc_name`), checked here so that a bad name fails before any system call
/// and is never truncated.
pub fn validate(name: &str) -> Result<bool> {
    let reject = |reason| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("the name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return reject("the name is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return reject("the name is a path component");
    }
    if name.contains('\0') {
        return reject("the name contains NUL");
    }
    if name.contains('/') {
        return reject("the name contains '/'");
    }
    if name.contains(':') {
        return reject("the name contains ':'");
    }
    if name.chars().any(char::is_whitespace) {
        return reject("the name contains whitespace");
    }
    let percents = name.matches('%').count();
    if percents == 0 {
        return Ok(false);
    }
    if percents > 1 {
        return reject("the name has more than one '%'");
    }
    if !name.contains("%d") {
        return reject("the only format allowed is %d");
    }
    Ok(true)
}

/// Checks that the kernel's name for a template is the template with a number in it.
pub fn matches_template(template: &str, name: &str) -> bool {
    let Some((prefix, suffix)) = template.split_once("%d") else {
        return template == name;
    };
    name.len() > prefix.len() + suffix.len()
        && name.starts_with(prefix)
        && name.ends_with(suffix)
        && name[prefix.len()..name.len() - suffix.len()]
            .bytes()
            .all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(name: &str) -> &'static str {
        match validate(name) {
            Err(Error::InvalidName { reason, .. }) => reason,
            other => panic!("{name:?} was not rejected: {other:?}"),
        }
    }

    #[test]
    fn exact_names_and_templates_are_accepted() {
        assert!(!validate("tap0").unwrap());
        assert!(!validate("a").unwrap());
        assert!(!validate("exactly15bytes_").unwrap());
        assert!(validate("tap%d").unwrap());
        assert!(validate("%d").unwrap());
        assert!(validate("vm%d-net").unwrap());
    }

    #[test]
    fn invalid_names_are_rejected_with_a_reason() {
        assert_eq!(reason(""), "the name is empty");
        assert_eq!(
            reason("sixteen_bytes_xx"),
            "the name is longer than 15 bytes"
        );
        assert_eq!(reason("ééééééééé"), "the name is longer than 15 bytes");
        assert_eq!(reason("."), "the name is a path component");
        assert_eq!(reason(".."), "the name is a path component");
        assert_eq!(reason("tap\0"), "the name contains NUL");
        assert_eq!(reason("a/b"), "the name contains '/'");
        assert_eq!(reason("eth0:1"), "the name contains ':'");
        assert_eq!(reason("tap 0"), "the name contains whitespace");
        assert_eq!(reason("tap\t0"), "the name contains whitespace");
        assert_eq!(reason("tap\n"), "the name contains whitespace");
        assert_eq!(reason("tap\u{a0}"), "the name contains whitespace");
        assert_eq!(reason("t%d%d"), "the name has more than one '%'");
        assert_eq!(reason("tap%s"), "the only format allowed is %d");
        assert_eq!(reason("tap%"), "the only format allowed is %d");
    }

    #[test]
    fn template_results_are_checked() {
        assert!(matches_template("tap%d", "tap0"));
        assert!(matches_template("tap%d", "tap123"));
        assert!(matches_template("vm%d-n", "vm7-n"));
        assert!(!matches_template("tap%d", "tap"));
        assert!(!matches_template("tap%d", "tapx"));
        assert!(!matches_template("tap%d", "ta12"));
        assert!(matches_template("tap0", "tap0"));
    }
}

//! What the shim's test binaries share: the built binary, the repository's files, the guest
//! assets and the reading of `sandbox check` output.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The binary under test.
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-kata-v2");

/// A file of the repository's `configs/`.
pub fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

/// `$GUEST_DIR` or the repository's `.cache/guest`, checked to hold the guest.
pub fn guest_dir() -> PathBuf {
    let assets = workspace_tests::GuestAssets::find();
    assets
        .kernel
        .parent()
        .expect("the kernel is in a directory")
        .to_path_buf()
}

/// The `sandbox check` line about `name` (its second word), failing with the whole output
/// when there is none.
pub fn check_line(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
        .to_string()
}

//! `containerd-shim-kata-v2`.
fn main() {}

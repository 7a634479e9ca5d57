//! TAP devices in pure Rust over `nix` and `libc`.

//! What the guest's `/init` says on the console when the guest cannot serve.
//!
//! The init of `scripts/guest-assets.sh` prints one line starting with [`INIT_ERROR_MARKER`]
//! and powers the guest off when a step it cannot do without fails (a kernel module that does
//! not load, the agent missing or failing). A host that waits for the agent and sees the VM
//! exit reads the console log with [`init_failure_in`] and reports that line instead of an
//! agent timeout.
//!
//! ```
//! use guest_agent::console::init_failure;
//!
//! let console = "[    1.9] virtio_net: disagrees about version of symbol module_layout\n\
//!                guest-init: error: module virtio_net did not load: invalid module format\r\n\
//!                [    2.0] reboot: Power down\n";
//! assert_eq!(
//!     init_failure(console).as_deref(),
//!     Some("module virtio_net did not load: invalid module format")
//! );
//! assert_eq!(init_failure("guest-init: ready\n"), None);
//! ```

use std::path::Path;

/// The start of the line the guest's init prints before powering off on a fatal error.
pub const INIT_ERROR_MARKER: &str = "guest-init: error: ";

/// The text of the last init error line in `console`, if the init printed one.
pub fn init_failure(console: &str) -> Option<String> {
    console
        .lines()
        .rev()
        .find_map(|line| {
            line.find(INIT_ERROR_MARKER)
                .map(|at| &line[at + INIT_ERROR_MARKER.len()..])
        })
        .map(|text| text.trim_end().to_string())
}

/// [`init_failure`] of the console log at `path`; `None` when it cannot be read or holds no
/// init error. Bytes that are not UTF-8 (a console carries escape sequences) are replaced.
pub fn init_failure_in(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    init_failure(&String::from_utf8_lossy(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_line_wins_and_its_prefix_may_follow_kernel_output() {
        let console = "guest-init: error: first\n[ 2.1] x guest-init: error: second \n";
        assert_eq!(init_failure(console).as_deref(), Some("second"));
    }

    #[test]
    fn a_console_without_an_error_line_has_no_failure() {
        assert_eq!(init_failure(""), None);
        assert_eq!(
            init_failure("guest-init: ready\nguest-init: errors ahead\n"),
            None
        );
        assert_eq!(init_failure_in(Path::new("/nonexistent/console.log")), None);
    }
}

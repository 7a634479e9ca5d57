//! What every backend asks of the host CPU: whether it offers hardware virtualization.
//!
//! A `/dev/kvm` can exist without it (a nested KVM): small guests run there, a stock Linux
//! kernel does not. Backends decide what to do with the answer; this only reads it.

/// Whether `/proc/cpuinfo` text shows `vmx` (Intel VT-x) or `svm` (AMD-V) among the flags of
/// any CPU. `None` when it has no `flags` line, so nothing can be told.
pub fn cpu_hardware_virtualization(cpuinfo: &str) -> Option<bool> {
    let mut flag_lines = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .peekable();
    flag_lines.peek()?;
    Some(flag_lines.any(|(_, v)| v.split_whitespace().any(|f| f == "vmx" || f == "svm")))
}

/// Why [`probe_hardware_virtualization`] cannot tell.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `/proc/cpuinfo` could not be read.
    #[error("reading {CPUINFO}")]
    ReadCpuinfo(#[source] std::io::Error),
    /// `/proc/cpuinfo` has no `flags` line.
    #[error("no flags line in {CPUINFO}")]
    NoFlags,
}

/// Where the kernel lists the CPUs' flags.
const CPUINFO: &str = "/proc/cpuinfo";

/// [`cpu_hardware_virtualization`] of this host; the error says why it cannot be told.
pub fn probe_hardware_virtualization() -> Result<bool, ProbeError> {
    let text = std::fs::read_to_string(CPUINFO).map_err(ProbeError::ReadCpuinfo)?;
    cpu_hardware_virtualization(&text).ok_or(ProbeError::NoFlags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_are_read_as_words() {
        assert_eq!(
            cpu_hardware_virtualization("flags\t: fpu vme vmx sse\n"),
            Some(true)
        );
        assert_eq!(
            cpu_hardware_virtualization("flags\t\t: fpu svm\n"),
            Some(true)
        );
        assert_eq!(
            cpu_hardware_virtualization("flags\t: fpu vmxnet sse\nmodel name : vmx\n"),
            Some(false)
        );
        assert_eq!(cpu_hardware_virtualization("processor\t: 0\n"), None);
    }

    #[test]
    fn probe_errors_name_the_file_and_keep_the_cause_as_source() {
        use std::error::Error as _;
        // ENOENT.
        let e = ProbeError::ReadCpuinfo(std::io::Error::from_raw_os_error(2));
        assert_eq!(e.to_string(), "reading /proc/cpuinfo");
        assert!(e
            .source()
            .is_some_and(|s| s.to_string().contains("No such file")));
        assert_eq!(
            ProbeError::NoFlags.to_string(),
            "no flags line in /proc/cpuinfo"
        );
    }
}

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

/// [`cpu_hardware_virtualization`] of this host; the error says why it cannot be told.
pub fn probe_hardware_virtualization() -> Result<bool, String> {
    let text =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    cpu_hardware_virtualization(&text).ok_or_else(|| "no flags line in /proc/cpuinfo".into())
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
}

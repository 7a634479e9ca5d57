//! `set_clock` and `set_hostname`: what makes a VM restored from a template its own machine
//! (it wakes with the template's clock and name).

use guest_agent::protocol::{Done, SetClock, SetHostname};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// Sets CLOCK_REALTIME.
pub fn set_clock(request: &SetClock) -> Result<Done, String> {
    let ms = i64::try_from(request.unix_ms).map_err(|_| "The time is out of range".to_string())?;
    let ts = TimeSpec::new(ms / 1000, (ms % 1000) * 1_000_000);
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| {
        format!(
            "Setting the clock to {} ms since the epoch: {e}",
            request.unix_ms
        )
    })?;
    Ok(Done {})
}

/// Sets the UTS hostname.
pub fn set_hostname(request: &SetHostname) -> Result<Done, String> {
    let name = &request.hostname;
    if name.is_empty() || name.len() > 64 || name.contains('\0') {
        return Err(format!(
            "Hostname {name:?} must be 1 to 64 bytes without NUL"
        ));
    }
    nix::unistd::sethostname(name).map_err(|e| format!("Setting the hostname to {name}: {e}"))?;
    Ok(Done {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_hostnames_are_refused_before_any_change() {
        for bad in ["", "a\0b", &"x".repeat(65)] {
            let err = set_hostname(&SetHostname {
                hostname: bad.to_string(),
            })
            .unwrap_err();
            assert!(err.contains("1 to 64 bytes"), "{err}");
        }
    }
}

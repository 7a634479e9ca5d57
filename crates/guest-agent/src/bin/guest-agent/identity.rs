//! `set_clock`, `set_hostname` and `seed_random`: what makes a VM restored from a template its
//! own machine (it wakes with the template's clock, name and RNG state; a guest kernel
//! without `CONFIG_VMGENID`, as Debian's cloud kernel is, does not reseed on its own).

use std::os::fd::AsRawFd;

use base64::Engine as _;
use guest_agent::protocol::{Done, SeedRandom, SetClock, SetHostname};
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

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Adds the host's bytes to the input pool, credited, and reseeds the CRNG from it.
pub fn seed_random(request: &SeedRandom) -> Result<Done, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&request.data)
        .map_err(|e| format!("The seed is not base64: {e}"))?;
    if !(16..=512).contains(&bytes.len()) {
        return Err(format!("The seed has {} bytes, not 16 to 512", bytes.len()));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("Opening /dev/urandom: {e}"))?;
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its header, alive for
    // the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "Adding the seed to the RNG (RNDADDENTROPY): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(format!(
            "Reseeding the RNG (RNDRESEEDCRNG): {}",
            std::io::Error::last_os_error()
        ));
    }
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

    #[test]
    fn seeds_of_the_wrong_size_or_encoding_are_refused() {
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 8]);
        for (data, want) in [("%%", "not base64"), (short.as_str(), "8 bytes")] {
            let err = seed_random(&SeedRandom {
                data: data.to_string(),
            })
            .unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}

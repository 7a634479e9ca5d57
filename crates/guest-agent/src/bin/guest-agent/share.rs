//! `mount_share`: mounts a virtio-fs share.

use std::path::Path;

use guest_agent::protocol::{Done, MountShare};
use nix::mount::MsFlags;

/// `mount -t virtiofs TAG TARGET`, read-only if asked; creates `TARGET`.
pub fn mount(request: &MountShare) -> Result<Done, String> {
    let target = Path::new(&request.target);
    if !target.is_absolute() {
        return Err(format!(
            "Share target {:?} is not an absolute path",
            request.target
        ));
    }
    if request.tag.is_empty() {
        return Err("Share tag is empty".into());
    }
    std::fs::create_dir_all(target)
        .map_err(|e| format!("Creating the share target {}: {e}", target.display()))?;
    let mut flags = MsFlags::empty();
    if request.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(request.tag.as_str()),
        target,
        Some("virtiofs"),
        flags,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "Mounting virtio-fs share {:?} on {}: {e}",
            request.tag,
            target.display()
        )
    })?;
    Ok(Done {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_target_or_empty_tag_is_refused_before_mounting() {
        let relative = MountShare {
            tag: "kataShared".into(),
            target: "run/shared".into(),
            read_only: false,
        };
        assert!(mount(&relative)
            .unwrap_err()
            .contains("not an absolute path"));
        let untagged = MountShare {
            tag: String::new(),
            target: "/nonexistent/target".into(),
            read_only: true,
        };
        assert_eq!(mount(&untagged).unwrap_err(), "Share tag is empty");
    }
}

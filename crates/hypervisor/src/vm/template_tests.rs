//! The core's checks around `save_template`, on the fake backend.

use std::time::Duration;

use crate::testing::{Call, FakeHypervisor};
use crate::{
    Boot, Capabilities, Error, Hypervisor, HypervisorConfig, Operation, SandboxSpec, VmState,
};

fn spec(id: &str, boot: Boot) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        netns: None,
        config: HypervisorConfig {
            kernel: "/vmlinuz".into(),
            boot,
            ..Default::default()
        },
    }
}

fn with_templates() -> Capabilities {
    Capabilities {
        templates: true,
        ..Default::default()
    }
}

async fn running(caps: Capabilities, spec: &SandboxSpec) -> FakeHypervisor {
    let fake = FakeHypervisor::fake(caps);
    fake.prepare(spec).await.unwrap();
    fake.start(Duration::from_secs(1)).await.unwrap();
    fake
}

#[tokio::test]
async fn a_running_template_source_is_saved_and_left_paused() {
    let dir = tempfile::tempdir().unwrap();
    let boot = Boot::TemplateSource {
        dir: dir.path().into(),
    };
    let fake = running(with_templates(), &spec("src", boot)).await;
    let files = fake.save_template().await.unwrap();
    assert_eq!(files.memory, dir.path().join("memory"));
    assert_eq!(files.state, dir.path().join("state"));
    assert!(files.state.exists());
    assert_eq!(fake.state().await, VmState::Paused);
    assert!(fake.calls().contains(&Call::SaveTemplate));
    // Saved once: a paused VM is not saved again.
    assert!(matches!(
        fake.save_template().await.unwrap_err(),
        Error::InvalidState {
            operation: Operation::SaveTemplate,
            state: VmState::Paused
        }
    ));
    fake.cleanup().await.unwrap();
}

#[tokio::test]
async fn only_a_running_vm_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let boot = Boot::TemplateSource {
        dir: dir.path().into(),
    };
    let fake = FakeHypervisor::fake(with_templates());
    let refused = |e: Error, state| {
        assert!(
            matches!(e, Error::InvalidState { operation: Operation::SaveTemplate, state: s } if s == state),
            "{e:?}"
        )
    };
    refused(fake.save_template().await.unwrap_err(), VmState::Created);
    fake.prepare(&spec("early", boot)).await.unwrap();
    refused(fake.save_template().await.unwrap_err(), VmState::Prepared);
    fake.start(Duration::from_secs(1)).await.unwrap();
    fake.stop().await.unwrap();
    refused(fake.save_template().await.unwrap_err(), VmState::Stopped);
    assert!(!fake.calls().contains(&Call::SaveTemplate));
    assert!(!dir.path().join("state").exists());
    fake.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_vm_not_booted_as_a_template_source_is_refused_before_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("memory"), b"").unwrap();
    std::fs::write(dir.path().join("state"), b"").unwrap();
    for (id, boot) in [
        ("cold", Boot::Cold),
        (
            "clone",
            Boot::FromTemplate {
                dir: dir.path().into(),
            },
        ),
    ] {
        let fake = running(with_templates(), &spec(id, boot)).await;
        let err = fake.save_template().await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(c) if c.field == "boot"),
            "{err:?}"
        );
        assert_eq!(fake.state().await, VmState::Running);
        assert!(!fake.calls().contains(&Call::SaveTemplate));
        fake.cleanup().await.unwrap();
    }
}

#[tokio::test]
async fn a_backend_without_templates_says_unsupported_and_the_vm_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let boot = Boot::TemplateSource {
        dir: dir.path().into(),
    };
    let fake = running(Capabilities::default(), &spec("nocap", boot)).await;
    let err = fake.save_template().await.unwrap_err();
    assert!(err.is_unsupported(), "{err:?}");
    assert_eq!(fake.state().await, VmState::Running);
    fake.cleanup().await.unwrap();
}

#[tokio::test]
async fn a_clone_whose_template_is_missing_fails_prepare_with_nothing_made() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::fake(with_templates());
    let boot = Boot::FromTemplate {
        dir: dir.path().into(),
    };
    let err = fake.prepare(&spec("orphan", boot)).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(c) if c.field == "boot.dir"),
        "{err:?}"
    );
    assert_eq!(fake.state().await, VmState::Created);
    assert!(fake.calls().is_empty());
}

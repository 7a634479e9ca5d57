//! Re-attaching to a QEMU that an earlier runtime process started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hypervisor::{
    AgentAddress, ConfigError, DeviceId, DeviceInfo, Error, Operation, Result, SavedState, Vm,
    VmState,
};
use slog::info;

use crate::cmdline::{Accel, Machine};
use crate::exit::spawn_exit_watch;
use crate::process;
use crate::qmp::QmpClient;
use crate::{Qemu, QemuHypervisor, QemuOptions, QemuSandbox, RootPort, RunDir, BACKEND};

/// Re-attaches to a QEMU that an earlier runtime process started, from the state that
/// process saved with [`save_state`](hypervisor::Hypervisor::save_state): reconnects to
/// its QMP socket, reads whether it runs or is paused, and watches its pid for exit.
pub async fn restore(
    log: slog::Logger,
    opts: QemuOptions,
    saved: SavedState,
) -> Result<QemuHypervisor> {
    if saved.backend != BACKEND {
        return Err(ConfigError::new(
            "backend",
            format!(
                "saved state is for the {} backend, not {BACKEND}",
                saved.backend
            ),
        )
        .into());
    }
    if !saved.state.is_alive() {
        return Err(Error::InvalidState {
            operation: Operation::Start,
            state: saved.state,
        });
    }
    let data = &saved.backend_data;
    let field = |name: &str| {
        data[name].as_str().map(String::from).ok_or_else(|| {
            ConfigError::new(
                format!("backend_data.{name}"),
                "missing from the saved state",
            )
        })
    };
    let run = RunDir {
        dir: PathBuf::from(field("run_dir")?),
    };
    let machine = Machine::parse(&field("machine")?)
        .ok_or_else(|| ConfigError::new("backend_data.machine", "unknown machine type"))?;
    let accel = match field("accel")?.as_str() {
        "kvm" => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let agent: AgentAddress = serde_json::from_value(data["agent"].clone())
        .map_err(|e| ConfigError::new("backend_data.agent", e))?;
    let ports: Vec<RootPort> = data["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(RootPort {
                id: p["id"].as_str()?.to_string(),
                slot: u8::try_from(p["slot"].as_u64()?).ok()?,
                used_by: p["used_by"]
                    .as_str()
                    .and_then(|id| hypervisor::DeviceId::new(id).ok()),
            })
        })
        .collect();

    let pid = saved.pids.vmm;
    let child = process::watch_pid(pid)
        .map_err(|e| Error::backend(format!("Watching QEMU pid {pid}"), e))?;
    let qmp = QmpClient::connect(&run.qmp(), opts.qmp_timeout)
        .await
        .map_err(|e| Error::backend(format!("Re-attaching to QEMU pid {pid}"), e))?;
    let events = qmp.subscribe();
    let status = qmp
        .execute("query-status", None, opts.qmp_timeout)
        .await
        .map_err(|e| Error::backend("Querying QEMU's run state", e))?;
    let state = if status["running"].as_bool() == Some(true) {
        VmState::Running
    } else {
        VmState::Paused
    };

    let hot: BTreeMap<DeviceId, DeviceInfo> = saved
        .devices
        .iter()
        .map(|d| (d.id.clone(), d.clone()))
        .collect();
    // Unplugs the guest had not acknowledged are still pending: their ports stay reserved
    // until QEMU no longer has the device.
    let unplugging = data["unplug_pending"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| DeviceId::new(id.as_str()?).ok())
        .filter(|id| hot.contains_key(id))
        .collect();
    let unsettled = unsettled_from(data, ports.len());
    let sandbox = QemuSandbox {
        machine: Some(machine),
        accel: Some(accel),
        agent: Some(agent),
        run: Some(run.clone()),
        hot,
        unsettled,
        unplugging,
        ports,
        qmp: Some(Arc::new(qmp)),
        process: Some(child),
        ..QemuSandbox::default()
    };
    let qemu = Qemu::new(log, opts);
    let log = qemu.log.clone();
    let hv = Vm::restored(
        qemu,
        saved.sandbox.clone(),
        run.dir,
        state,
        saved.pids.clone(),
        sandbox,
    );
    let life = hv.lifecycle().clone();
    hv.with_sandbox(|s| {
        let child = s.process.as_ref().expect("set above");
        spawn_exit_watch(life, child, events, log.clone());
    })
    .await;
    info!(log, "re-attached"; "sandbox" => &saved.sandbox.id, "pid" => pid, "state" => state.to_string());
    Ok(hv)
}

/// The saved hotplugs of unknown outcome whose port is in range; the next device operation
/// settles them with QEMU.
fn unsettled_from(
    data: &serde_json::Value,
    ports: usize,
) -> std::collections::BTreeMap<hypervisor::DeviceId, crate::reconcile::Unsettled> {
    data["unsettled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| serde_json::from_value::<crate::reconcile::Unsettled>(u.clone()).ok())
        .filter(|u| u.port < ports)
        .map(|u| (u.info.id.clone(), u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::Backend;

    #[test]
    fn a_hotplug_of_unknown_outcome_survives_save_and_restore_with_its_port() {
        use hypervisor::device::GuestLocation;
        use hypervisor::DeviceKind;
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let qemu = Qemu::new(log, QemuOptions::default());
        let id = DeviceId::new("net1").unwrap();
        let mut sb = QemuSandbox {
            ports: vec![RootPort {
                id: "rp0".into(),
                slot: 2,
                used_by: Some(id.clone()),
            }],
            ..QemuSandbox::default()
        };
        let info = DeviceInfo {
            id: id.clone(),
            kind: DeviceKind::Network,
            location: GuestLocation::Pci {
                path: "02/00".into(),
            },
            hotplugged: true,
            mac: None,
            queue_pairs: Some(1),
            host: Some("tap1".into()),
        };
        sb.unsettled.insert(
            id.clone(),
            crate::reconcile::Unsettled {
                info,
                port: 0,
                fd_names: vec!["fd-net1-0".into()],
                backend_maybe_added: true,
            },
        );
        let (_, data) = qemu.saved(&sb);
        let restored = unsettled_from(&data, 1);
        let u = restored
            .get(&id)
            .expect("the unsettled hotplug is restored");
        assert_eq!((u.port, u.backend_maybe_added), (0, true));
        assert_eq!(u.fd_names, ["fd-net1-0"]);
        assert!(
            unsettled_from(&data, 0).is_empty(),
            "a port out of range is not trusted"
        );
    }
}

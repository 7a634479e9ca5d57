//! The VM lifecycle as a state machine.
//!
//! ```text
//!  Created --prepare--> Prepared --start--> Running <--pause/resume--> Paused
//!                          |                   |                         |
//!                          +------stop---------+----------stop-----------+--> Stopped
//! ```
//!
//! Devices added in `Prepared` are cold-plugged (part of the VM's start-up configuration);
//! devices added while `Running` are hot-plugged, if the backend can. Devices need the
//! sandbox's context (its namespace, its run directory), so none can be added before
//! `prepare`, nor while `Paused`, nor once the VM is `Stopped`. A VMM that exits on its own moves the VM
//! to `Stopped` as well.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The backend object exists; nothing is allocated.
    Created,
    /// Sandbox id, namespace and configuration are set; cold-plug devices may be added.
    Prepared,
    /// The guest runs.
    Running,
    /// The vCPUs are stopped; the VMM is alive.
    Paused,
    /// The VMM has exited (asked to, or on its own).
    Stopped,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Prepared => "prepared",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        })
    }
}

/// A request that changes or depends on the VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// [`Hypervisor::prepare`](crate::Hypervisor::prepare).
    Prepare,
    /// [`Hypervisor::start`](crate::Hypervisor::start).
    Start,
    /// [`Hypervisor::pause`](crate::Hypervisor::pause).
    Pause,
    /// [`Hypervisor::resume`](crate::Hypervisor::resume).
    Resume,
    /// [`Hypervisor::stop`](crate::Hypervisor::stop).
    Stop,
    /// [`Hypervisor::add_device`](crate::Hypervisor::add_device).
    AddDevice,
    /// [`Hypervisor::remove_device`](crate::Hypervisor::remove_device).
    RemoveDevice,
    /// [`Hypervisor::save_template`](crate::Hypervisor::save_template).
    SaveTemplate,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Prepare => "prepare",
            Operation::Start => "start",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Stop => "stop",
            Operation::AddDevice => "add a device",
            Operation::RemoveDevice => "remove a device",
            Operation::SaveTemplate => "save a template",
        })
    }
}

/// How a device reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlugMode {
    /// Part of the VM's configuration at start.
    Cold,
    /// Added to or removed from a running guest.
    Hot,
}

impl VmState {
    /// The state after `op` succeeds, or [`Error::InvalidState`] if `op` is not allowed now.
    ///
    /// Device operations leave the state unchanged. Stopping a stopped VM is allowed and
    /// does nothing, so that teardown paths can call `stop` unconditionally.
    pub fn next(self, op: Operation) -> Result<VmState> {
        use Operation as O;
        use VmState as S;
        let next = match (self, op) {
            (S::Created, O::Prepare) => S::Prepared,
            (S::Prepared, O::Start) => S::Running,
            (S::Running, O::Pause) => S::Paused,
            (S::Paused, O::Resume) => S::Running,
            (S::Created | S::Prepared | S::Running | S::Paused | S::Stopped, O::Stop) => S::Stopped,
            (S::Prepared | S::Running, O::AddDevice | O::RemoveDevice) => self,
            (S::Running, O::SaveTemplate) => S::Paused,
            _ => {
                return Err(Error::InvalidState {
                    operation: op,
                    state: self,
                })
            }
        };
        Ok(next)
    }

    /// Whether a device added now is cold- or hot-plugged.
    pub fn plug_mode(self, op: Operation) -> Result<PlugMode> {
        self.next(op)?;
        Ok(match self {
            VmState::Running => PlugMode::Hot,
            _ => PlugMode::Cold,
        })
    }

    /// True while a VMM process or thread is alive.
    pub fn is_alive(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STATES: [VmState; 5] = [
        VmState::Created,
        VmState::Prepared,
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
    ];

    #[test]
    fn the_normal_lifecycle_is_accepted() {
        let mut s = VmState::Created;
        for op in [
            Operation::Prepare,
            Operation::Start,
            Operation::Pause,
            Operation::Resume,
            Operation::Stop,
        ] {
            s = s.next(op).unwrap();
        }
        assert_eq!(s, VmState::Stopped);
    }

    #[test]
    fn starting_twice_is_rejected_with_the_state() {
        let err = VmState::Running.next(Operation::Start).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidState {
                operation: Operation::Start,
                state: VmState::Running
            }
        ));
        assert_eq!(err.to_string(), "cannot start while the VM is running");
    }

    #[test]
    fn resuming_a_running_vm_is_rejected() {
        assert!(VmState::Running.next(Operation::Resume).is_err());
    }

    #[test]
    fn adding_a_device_after_stop_is_rejected() {
        assert!(VmState::Stopped.plug_mode(Operation::AddDevice).is_err());
        assert!(VmState::Stopped.next(Operation::RemoveDevice).is_err());
    }

    #[test]
    fn adding_a_device_while_paused_is_rejected() {
        assert!(VmState::Paused.plug_mode(Operation::AddDevice).is_err());
    }

    #[test]
    fn plug_mode_is_cold_before_start_and_hot_after() {
        assert!(VmState::Created.plug_mode(Operation::AddDevice).is_err());
        assert_eq!(
            VmState::Prepared.plug_mode(Operation::AddDevice).unwrap(),
            PlugMode::Cold
        );
        assert_eq!(
            VmState::Running.plug_mode(Operation::AddDevice).unwrap(),
            PlugMode::Hot
        );
    }

    #[test]
    fn stop_is_accepted_from_every_state() {
        for s in ALL_STATES {
            assert_eq!(s.next(Operation::Stop).unwrap(), VmState::Stopped);
        }
    }

    #[test]
    fn prepare_is_accepted_only_once() {
        for s in ALL_STATES {
            assert_eq!(s.next(Operation::Prepare).is_ok(), s == VmState::Created);
        }
    }

    #[test]
    fn start_and_pause_need_the_right_predecessor() {
        for s in ALL_STATES {
            assert_eq!(s.next(Operation::Start).is_ok(), s == VmState::Prepared);
            assert_eq!(s.next(Operation::Pause).is_ok(), s == VmState::Running);
            assert_eq!(s.next(Operation::Resume).is_ok(), s == VmState::Paused);
        }
    }
}

//! Front-ends over the sandbox layer ([`crate::sandbox`]) for the operator commands:
//! `sandbox run` ([`run`]) and the control socket it serves, with its client for `sandbox
//! hotplug-nic` and `sandbox facts` ([`control`]).

pub mod control;
pub mod run;

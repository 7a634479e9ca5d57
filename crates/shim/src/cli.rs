//! Front-ends over the sandbox layer ([`crate::sandbox`]) for the operator commands:
//! `sandbox run` ([`run`]) and the control socket it serves, with its client for `sandbox
//! hotplug-nic`, `sandbox facts` and `sandbox ps` ([`control`]), `sandbox exec` ([`exec`]),
//! and `sandbox template` ([`template`]).

pub mod control;
pub mod exec;
pub mod run;
pub mod template;

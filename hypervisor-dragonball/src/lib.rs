//! Dragonball backend of the [`hypervisor`] contract.

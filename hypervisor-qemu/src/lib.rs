//! QEMU backend of the [`hypervisor`] contract.

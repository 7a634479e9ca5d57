//! The QEMU backend as the VM tests use it: q35 or microvm under TCG (KVM where the CPU
//! really offers it), run files in the test's temp dir, logs through the test harness.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hypervisor::{Hypervisor, HypervisorConfig};
use hypervisor_qemu::{QemuHypervisor, QemuOptions};

use crate::{test_logger, Backend, GuestAssets};

/// A QEMU backend for the shared scenarios.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `q35` or `microvm`.
    pub machine: &'static str,
    /// The configuration's root filesystem `image`.
    pub image: Option<PathBuf>,
}

impl Qemu {
    /// q35, no image: the default machine.
    pub const Q35: Qemu = Qemu {
        machine: "q35",
        image: None,
    };

    /// The backend options the tests use: run files under `run_root`.
    pub fn options(run_root: &Path) -> QemuOptions {
        QemuOptions {
            run_root: run_root.to_path_buf(),
            ..Default::default()
        }
    }
}

impl Backend for Qemu {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        Arc::new(QemuHypervisor::new(test_logger(), Self::options(run_root)))
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            image: self.image.clone(),
            machine_type: Some(self.machine.into()),
            memory_mib: 256,
            ..Default::default()
        }
    }

    fn can_boot(&self) -> Result<(), String> {
        let qemu = QemuOptions::default().default_binary;
        if qemu.exists() {
            Ok(())
        } else {
            Err(format!(
                "{} is missing: run `make deps` (Debian package qemu-system-x86)",
                qemu.display()
            ))
        }
    }
}

/// A QEMU backend that keeps what it created, for checks only QEMU offers (raw QMP, its run
/// directory), with options of the test's choosing.
#[derive(Debug)]
pub struct Kept {
    qemu: Qemu,
    options: fn(&Path) -> QemuOptions,
    last: Mutex<Option<(Arc<QemuHypervisor>, PathBuf)>>,
}

impl Kept {
    /// Keeps the handles of `qemu`, created with [`Qemu::options`].
    pub fn new(qemu: Qemu) -> Kept {
        Self::with_options(qemu, Qemu::options)
    }

    /// Keeps the handles of `qemu`, created with the options `options` gives for a run root.
    pub fn with_options(qemu: Qemu, options: fn(&Path) -> QemuOptions) -> Kept {
        Kept {
            qemu,
            options,
            last: Mutex::new(None),
        }
    }

    /// The last handle created.
    pub fn hypervisor(&self) -> Arc<QemuHypervisor> {
        self.last.lock().unwrap().clone().expect("created").0
    }

    /// The run root of the last handle created.
    pub fn run_root(&self) -> PathBuf {
        self.last.lock().unwrap().clone().expect("created").1
    }
}

impl Backend for Kept {
    fn create(&self, run_root: &Path) -> Arc<dyn Hypervisor> {
        let hv = Arc::new(QemuHypervisor::new(test_logger(), (self.options)(run_root)));
        *self.last.lock().unwrap() = Some((hv.clone(), run_root.to_path_buf()));
        hv
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        self.qemu.config(assets)
    }

    fn can_boot(&self) -> Result<(), String> {
        self.qemu.can_boot()
    }
}

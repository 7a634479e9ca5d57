//! The QEMU backend as the VM tests use it: q35 or microvm under TCG (KVM where the CPU
//! really offers it), run files in the test's temp dir, logs through the test harness; and
//! the QMP queries the tests use to see what QEMU itself holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use hypervisor::Vm;
use hypervisor::{Hypervisor, HypervisorConfig};
use hypervisor_qemu::{Qemu as QemuBackend, QemuHypervisor, QemuOptions, QemuVm};
use serde_json::{json, Value};

use crate::{test_logger, Backend, GuestAssets};

/// A QEMU backend for the shared scenarios.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `q35` or `microvm`.
    pub machine: &'static str,
    /// The configuration's root filesystem `image`.
    pub image: Option<PathBuf>,
    /// Kernel parameters added to the configuration's, separated by whitespace (`""`: none).
    pub kernel_params: &'static str,
}

impl Qemu {
    /// q35, no image, no extra kernel parameters: the default machine.
    pub const Q35: Qemu = Qemu {
        machine: "q35",
        image: None,
        kernel_params: "",
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
        Arc::new(Vm::new(QemuBackend::new(
            test_logger(),
            Self::options(run_root),
        )))
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        let mut config = HypervisorConfig {
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            image: self.image.clone(),
            machine_type: Some(self.machine.into()),
            memory_mib: 256,
            ..Default::default()
        };
        config
            .kernel_params
            .extend(self.kernel_params.split_whitespace().map(String::from));
        config
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
/// directory), with backend options, configuration changes and a logger of the test's
/// choosing:
///
/// ```no_run
/// # use workspace_tests::qemu::{Kept, Qemu};
/// # use std::time::Duration;
/// let backend = Kept::new(Qemu::Q35)
///     .options(|root| hypervisor_qemu::QemuOptions {
///         qmp_timeout: Duration::from_secs(1),
///         ..Qemu::options(root)
///     })
///     .adjust(|config| config.vcpus = 2);
/// ```
#[derive(Debug)]
pub struct Kept {
    qemu: Qemu,
    options: fn(&Path) -> QemuOptions,
    adjust: fn(&mut HypervisorConfig),
    logger: fn() -> slog::Logger,
    last: Mutex<Option<(Arc<QemuHypervisor>, PathBuf)>>,
}

impl Kept {
    /// Keeps the handles of `qemu`, created with [`Qemu::options`] and [`test_logger`], with
    /// `qemu`'s configuration.
    pub fn new(qemu: Qemu) -> Kept {
        Kept {
            qemu,
            options: Qemu::options,
            adjust: |_| {},
            logger: test_logger,
            last: Mutex::new(None),
        }
    }

    /// Creates the handles with the options `options` gives for a run root.
    pub fn options(self, options: fn(&Path) -> QemuOptions) -> Kept {
        Kept { options, ..self }
    }

    /// Changes every configuration [`Backend::config`] gives with `adjust`, after `qemu`'s
    /// own.
    pub fn adjust(self, adjust: fn(&mut HypervisorConfig)) -> Kept {
        Kept { adjust, ..self }
    }

    /// Gives the handles the logger `logger` makes (a benchmark's `slog::Discard`, say).
    pub fn logger(self, logger: fn() -> slog::Logger) -> Kept {
        Kept { logger, ..self }
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
        let hv = Arc::new(Vm::new(QemuBackend::new(
            (self.logger)(),
            (self.options)(run_root),
        )));
        *self.last.lock().unwrap() = Some((hv.clone(), run_root.to_path_buf()));
        hv
    }

    fn config(&self, assets: &GuestAssets) -> HypervisorConfig {
        let mut config = self.qemu.config(assets);
        (self.adjust)(&mut config);
        config
    }

    fn can_boot(&self) -> Result<(), String> {
        self.qemu.can_boot()
    }
}

/// `human-monitor-command`, for what QMP of QEMU 7.2 cannot list (netdevs: `info network`).
pub async fn hmp(qemu: &QemuHypervisor, command: &str) -> Result<String> {
    let out = qemu
        .qmp_execute(
            "human-monitor-command",
            Some(json!({ "command-line": command })),
        )
        .await?;
    Ok(out.as_str().unwrap_or_default().to_string())
}

/// Ids of QEMU's devices (`qom-list /machine/peripheral`, its `child<...>` entries).
pub async fn device_ids(qemu: &QemuHypervisor) -> Result<Vec<String>> {
    let list = qemu
        .qmp_execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
        .await?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect())
}

/// `(device, root port)` of every device behind a root port, from `query-pci`.
pub async fn devices_behind_ports(qemu: &QemuHypervisor) -> Result<Vec<(String, String)>> {
    let pci = qemu.qmp_execute("query-pci", None).await?;
    let mut found = Vec::new();
    fn walk(devices: &Value, found: &mut Vec<(String, String)>) {
        for d in devices.as_array().into_iter().flatten() {
            if let Some(bridge) = d.get("pci_bridge") {
                let port = d["qdev_id"].as_str().unwrap_or_default().to_string();
                for child in bridge["devices"].as_array().into_iter().flatten() {
                    let id = child["qdev_id"].as_str().unwrap_or_default().to_string();
                    found.push((id, port.clone()));
                }
                walk(&bridge["devices"], found);
            }
        }
    }
    for bus in pci.as_array().into_iter().flatten() {
        walk(&bus["devices"], &mut found);
    }
    Ok(found)
}

/// Names of QEMU's block nodes (`query-named-block-nodes`).
pub async fn block_nodes(qemu: &QemuHypervisor) -> Result<Vec<String>> {
    let nodes = qemu.qmp_execute("query-named-block-nodes", None).await?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(String::from))
        .collect())
}

//! Preparing a sandbox: its run directory and record, its namespace, the prepared VM and
//! its cold devices (the agent's vsock, the shared directory, the NICs with their TAPs).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hypervisor::device::NetworkConfig;
use hypervisor::device::VsockConfig;
use hypervisor::{AgentChannelSource, DeviceConfig, DeviceInfo, MacAddress};
use slog::{info, warn};

use super::{ms, refuse_existing, Netns, Sandbox};
use crate::net::{self, NicPlan, Subnet24, TapHandoff};
use crate::pod;
use crate::records::{ClaimError, NetnsRecord, Record, Records, TapRecord};

impl Sandbox {
    /// Claims the run directory (its record says the id is taken), opens the given
    /// namespace or creates `kata-ID`, prepares the VM and adds its cold devices: the
    /// agent's vsock when the backend's agent channel needs one, the shared directory (a
    /// shared mount point) with `shared_fs = "virtio-fs"`, and one NIC per pod interface,
    /// or the sandbox's own TAP in a free /24.
    pub async fn prepare(&mut self) -> Result<()> {
        let t = Instant::now();
        // Run directory first, with its record: it also tells that the id is free. The
        // backend's run directory is known before the backend creates it.
        let mut record = Record::new(&self.id);
        record.backend_dir = Some(self.backend_dir.clone());
        self.records = Some(match Records::claim(&self.state_dir, record) {
            Ok(r) => r,
            Err(ClaimError::Taken) => {
                refuse_existing(&self.opts.run_root, &self.id)?;
                bail!(
                    "run directory {} appeared meanwhile",
                    self.state_dir.display()
                )
            }
            Err(ClaimError::Failed(e)) => return Err(e),
        });

        let given = self.opts.netns.clone();
        self.open_netns(given.as_deref()).await?;
        self.spec.netns = Some(self.netns_path().to_path_buf());
        info!(self.log, "network namespace ready"; "netns" => self.netns_path().display().to_string(),
            "owned" => matches!(self.netns, Some(Netns::Owned(_))));
        self.use_template().await?;

        self.hv
            .prepare(&self.spec)
            .await
            .with_context(|| format!("Preparing the {} VM", self.hv.name()))?;
        let caps = self.hv.capabilities().await;
        // Backends that cannot take open fds (Dragonball) open a persistent TAP by name.
        self.handoff = if caps.tap_fds {
            TapHandoff::Fds
        } else {
            TapHandoff::Name
        };
        if let AgentChannelSource::VsockDevice { guest_cid } = caps.agent_channel {
            self.devices
                .add(DeviceConfig::Vsock(VsockConfig { guest_cid }))
                .await
                .context("Adding the vsock device of the agent channel")?;
        }
        self.prepare_share().await?;
        self.pending = self.plug_nics().await?;
        self.timings.insert("prepare".to_string(), ms(t.elapsed()));
        Ok(())
    }

    async fn open_netns(&mut self, given: Option<&Path>) -> Result<()> {
        self.netns = Some(match given {
            Some(p) => {
                let p = netdev::netns::resolve(p);
                if !p.exists() {
                    bail!(
                        "network namespace {} does not exist: create it (ip netns add) or leave out --netns",
                        p.display()
                    );
                }
                self.record(|r| {
                    r.netns = Some(NetnsRecord {
                        path: p.clone(),
                        owned: false,
                    })
                })?;
                Netns::Given(p)
            }
            None => {
                let name = format!("kata-{}", self.id);
                let path = Path::new(netdev::NETNS_RUN_DIR).join(&name);
                // Someone else's: never recorded as ours, so no cleanup deletes it.
                if path.exists() {
                    bail!(
                        "network namespace {name} exists already and is not this sandbox's; delete it (ip netns del {name}) or pick another id"
                    );
                }
                // Recorded before it exists: a crash right after creating it leaves it listed.
                self.record(|r| r.netns = Some(NetnsRecord { path, owned: true }))?;
                let create = name.clone();
                match net::blocking(move || netdev::NetNs::create(&create)).await? {
                    Ok(ns) => Netns::Owned(ns),
                    Err(e) => {
                        // Not ours (it may be another sandbox's): the record must not say so.
                        self.record(|r| r.netns = None)?;
                        return Err(anyhow::Error::from(e)
                            .context(format!("Creating network namespace {name}")));
                    }
                }
            }
        });
        Ok(())
    }

    /// With `[factory] enable_template`: the template of this configuration (made now if
    /// there is none), which the VM is then restored from. A template has one NIC and no
    /// shared directory: the first NIC is bound to the template's ([`Sandbox::plug_nics`]),
    /// the others are hot-plugged once it runs ([`Sandbox::boot`]), and a configuration
    /// with `shared_fs` is refused (virtio-fs needs guest RAM shared with its daemon, which
    /// a clone's copy-on-write RAM cannot be).
    async fn use_template(&mut self) -> Result<()> {
        if !self.shim_config.factory.enable_template {
            return Ok(());
        }
        if self.spec.config.shared_fs != hypervisor::SharedFsKind::None {
            bail!(
                "[factory] enable_template needs shared_fs = \"none\" in [hypervisor.{}]: a VM restored from a template has copy-on-write memory, which virtio-fs cannot share with its daemon",
                self.backend.name()
            );
        }
        let t = Instant::now();
        let template =
            crate::template::ensure(&self.log, &self.shim_config, &self.opts.run_root).await?;
        self.spec.config.boot = hypervisor::Boot::FromTemplate {
            dir: template.dir.clone(),
        };
        info!(self.log, "starting from a VM template"; "template" => &template.digest,
            "ms" => ms(t.elapsed()));
        self.timings.insert("template".to_string(), ms(t.elapsed()));
        self.template = Some(template);
        Ok(())
    }

    /// The NICs the VM boots with: one per pod interface, or the sandbox's own TAP. A VM
    /// restored from a template boots with the template's NIC only, bound to the first TAP
    /// (there is always one); the rest wait for [`Sandbox::boot`].
    async fn plug_nics(&mut self) -> Result<Vec<(DeviceInfo, NicPlan)>> {
        if let Some(Netns::Given(path)) = &self.netns {
            let path = path.clone();
            let opts = endpoint::AttachOptions {
                queues: self.queues,
                handoff: self.handoff,
            };
            let records = self.records.as_mut().expect("claimed");
            self.pod = pod::attach(&self.log, &path, &opts, records).await?;
        }
        let nics: Vec<(NicPlan, NetworkConfig)> = match &self.pod {
            Some(pod) => pod
                .endpoints
                .iter()
                .map(|ep| (pod::plan(ep), ep.network.clone()))
                .collect(),
            None => {
                let nic = self.new_host_nic().await?;
                vec![(nic.plan(), nic.config)]
            }
        };
        if let Some(pod) = &self.pod {
            self.taps
                .extend(pod.endpoints.iter().map(|ep| ep.tap_name.clone()));
        }
        let template_mac = self.template.as_ref().map(|t| t.meta.nic_mac);
        let mut plugged = Vec::new();
        for (mut plan, config) in nics {
            if template_mac.is_some() {
                // The template's NIC is taken: this one is hot-plugged.
                if !plugged.is_empty() {
                    self.deferred.push((DeviceConfig::Network(config), plan));
                    continue;
                }
                plan.template_mac = template_mac;
            }
            let info = self
                .devices
                .add(DeviceConfig::Network(config))
                .await
                .with_context(|| match &plan.pod_interface {
                    Some(iface) => {
                        format!("Adding the NIC on TAP {} (pod interface {iface})", plan.tap)
                    }
                    None => format!("Adding the NIC on TAP {}", plan.tap),
                })?;
            plugged.push((info, plan));
        }
        Ok(plugged)
    }

    /// A TAP in a free /24 with a MAC derived from the sandbox id and NIC number.
    pub(super) async fn new_host_nic(&mut self) -> Result<net::HostNic> {
        let ns = self.netns_path().to_path_buf();
        let handle = net::connect(&ns).await?;
        let used = net::used_networks(&handle).await?;
        let taken: Vec<Subnet24> = self
            .nics
            .iter()
            .filter_map(|n| n.host_address.as_deref())
            .filter_map(|a| Subnet24::parse(a).ok())
            .collect();
        let subnet = net::free_subnet(self.opts.subnet, &used, &taken)?;
        let n = self.taps.len();
        let mac = MacAddress::local_from_seed(format!("{}/nic{n}", self.id).as_bytes());
        let nic = net::create_tap(&handle, subnet, self.queues, mac, self.handoff).await?;
        let persistent = self.handoff == TapHandoff::Name;
        self.record(|r| {
            r.taps.push(TapRecord {
                name: nic.tap.clone(),
                netns: ns.clone(),
                persistent,
            })
        })?;
        self.taps.push(nic.tap.clone());
        if persistent {
            self.persistent_taps.push(nic.tap.clone());
        }
        info!(self.log, "TAP created"; "tap" => &nic.tap, "host" => format!("{}/24", subnet.host(1)),
            "queues" => self.queues);
        Ok(nic)
    }

    /// Removes a TAP of ours that no device uses (a failed hotplug, an unplugged NIC).
    pub(super) async fn forget_tap(&mut self, tap: &str) {
        self.taps.retain(|t| t != tap);
        if let Some(i) = self.persistent_taps.iter().position(|t| t == tap) {
            self.persistent_taps.remove(i);
            if let Err(e) = net::delete_tap(tap, self.netns_path()).await {
                warn!(self.log, "deleting an unused TAP"; "tap" => tap, "error" => e.to_string());
            }
        }
    }
}

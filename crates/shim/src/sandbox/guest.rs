//! The guest side of a sandbox: waiting for the agent, configuring the guest's NICs,
//! the facts of a ready sandbox.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use guest_agent::client::AgentClient;
use guest_agent::protocol::InterfaceConfig;
use hypervisor::AgentAddress;
use slog::info;

use super::{ms, Netns, Phase, Sandbox};
use crate::backend;
use crate::facts::{NicFacts, SandboxFacts};
use crate::net::{self, NicPlan};

/// How often the agent is asked whether the guest shows a plugged NIC yet (a listing is a
/// few `/sys` reads in the guest; the wait is most of a restored sandbox's start).
const NIC_POLL: Duration = Duration::from_millis(10);
/// How long the guest may take to show a NIC after it was plugged.
const GUEST_NIC_TIMEOUT: Duration = Duration::from_secs(30);

impl Sandbox {
    /// From a running VM to a ready sandbox: waits for the guest agent (within the agent
    /// timeout), has it mount the share (when there is one), gives the guest the addresses, MTU and routes of the NICs it booted with,
    /// and gathers the facts ([`Sandbox::facts`]). Race it against the VM's exit
    /// ([`Sandbox::exit_watch`]).
    pub async fn wait_ready(&mut self) -> Result<()> {
        let t = Instant::now();
        self.set_phase(Phase::Agent);
        let address = self.hv.agent_address().await?;
        info!(self.log, "waiting for the guest agent"; "agent" => address.to_string());
        let agent_timeout = self.opts.agent_timeout;
        let (agent, health) = progress(&self.log, "waiting for the guest agent", async {
            let mut agent = connect_agent(&address).await?;
            let health = agent
                .wait_ready(agent_timeout)
                .await
                .context("Waiting for the guest agent")?;
            anyhow::Ok((agent, health))
        })
        .await?;
        self.agent = Some(agent);
        self.timings
            .insert("agent_ready".to_string(), ms(t.elapsed()));
        info!(self.log, "guest agent ready"; "agent" => address.to_string(),
            "guest_uptime_ms" => health.uptime_ms, "ms" => ms(t.elapsed()));

        if self.template.is_some() {
            // A VM restored from a template wakes with the template's clock, RNG state and name.
            let agent = self.agent.as_ref().expect("set above");
            agent
                .sync_clock(Duration::from_secs(10))
                .await
                .context("Setting the guest's clock")?;
            agent
                .seed_random(Duration::from_secs(10))
                .await
                .context("Reseeding the guest's RNG")?;
            let hostname: String = self.id.chars().take(64).collect();
            agent
                .set_hostname(&hostname, Duration::from_secs(10))
                .await
                .context("Setting the guest's hostname")?;
        }

        self.mount_share().await?;

        let t = Instant::now();
        self.set_phase(Phase::GuestNetwork);
        for (info, plan) in std::mem::take(&mut self.pending) {
            let nic = self.configure_guest(&info, &plan, Instant::now()).await?;
            self.nics.push(nic);
        }
        self.timings
            .insert("guest_network".to_string(), ms(t.elapsed()));
        self.timings
            .insert("total".to_string(), ms(self.opts.began.elapsed()));

        let config = self.hv.config().await.ok();
        let (kind, wanted) = (self.backend, self.spec.config.accelerator);
        let binary = config.as_ref().and_then(|c| c.path.clone());
        // Opens /dev/kvm and reads the CPU's flags: off the async workers.
        let accelerator = net::blocking(move || {
            backend::probe_host(kind, wanted, binary.as_deref())
                .ok()
                .and_then(|p| p.accelerator.ok())
                .map(|(a, _)| a)
        })
        .await?;
        let pids = self.hv.pids().await?;
        self.facts = Some(SandboxFacts {
            id: self.id.clone(),
            backend: self.hv.name().to_string(),
            machine_type: config.and_then(|c| c.machine_type),
            accelerator,
            shim_pid: std::process::id(),
            vmm_pid: pids.vmm,
            vcpu_threads: pids.vcpus.clone(),
            netns: self.netns_path().to_path_buf(),
            netns_name: self.netns.as_ref().and_then(Netns::name),
            netns_owned: matches!(self.netns, Some(Netns::Owned(_))),
            nics: self.nics.clone(),
            agent: address.to_string(),
            console_log: self.hv.console_log().await,
            control_socket: self.control_socket(),
            timings_ms: self.timings.clone(),
        });
        self.set_phase(Phase::Serving);
        Ok(())
    }

    /// Waits for the guest to show the NIC of `plan` and gives it its addresses, MTU and
    /// routes through the agent.
    pub(super) async fn configure_guest(
        &mut self,
        info: &hypervisor::DeviceInfo,
        plan: &NicPlan,
        began: Instant,
    ) -> Result<NicFacts> {
        let mac = plan.mac;
        let agent = self.agent.as_mut().ok_or_else(|| anyhow!("no agent"))?;
        // A hot-plugged NIC shows up once the guest has probed the PCI device: wait for the
        // agent to list its MAC before configuring it. A template's NIC is there from the
        // start, with the template's MAC until the agent sets this one's: no wait.
        let wanted = plan.template_mac.unwrap_or(mac).to_string();
        if plan.template_mac.is_none() {
            let deadline = Instant::now() + GUEST_NIC_TIMEOUT;
            loop {
                let ifaces = agent
                    .list_interfaces(Duration::from_secs(10))
                    .await
                    .context("Listing the guest's interfaces")?;
                if ifaces
                    .iter()
                    .any(|i| i.mac.as_deref() == Some(wanted.as_str()))
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the guest did not show a NIC with MAC {wanted} within {GUEST_NIC_TIMEOUT:?} (see the console log)"
                    );
                }
                tokio::time::sleep(NIC_POLL).await;
            }
        }
        let done = agent
            .configure_interface(
                InterfaceConfig {
                    mac: wanted,
                    set_mac: plan.template_mac.map(|_| mac.to_string()),
                    addresses: plan.addresses.clone(),
                    mtu: plan.mtu,
                    routes: plan.routes.clone(),
                },
                Duration::from_secs(30),
            )
            .await
            .with_context(|| {
                format!(
                    "Configuring the guest NIC {mac} with {} (routes: {})",
                    plan.addresses.join(" "),
                    plan.routes_human().join("; ")
                )
            })?;
        Ok(NicFacts {
            id: info.id.to_string(),
            tap: plan.tap.clone(),
            pod_interface: plan.pod_interface.clone(),
            host_address: plan.host_address.clone(),
            guest_address: plan.addresses.first().cloned().unwrap_or_default(),
            guest_addresses: plan.addresses.clone(),
            routes: plan.routes_human(),
            guest_ip: plan.guest_ip(),
            mac: mac.to_string(),
            guest_interface: done.name,
            location: info.location.to_string(),
            hotplugged: info.hotplugged,
            setup_ms: ms(began.elapsed()),
        })
    }
}

impl Sandbox {
    /// Runs `argv` in the guest itself (outside any container) to its end, within 60 s.
    pub async fn guest_exec(&self, argv: Vec<String>) -> Result<guest_agent::protocol::ExecOutput> {
        let agent = self
            .agent
            .as_ref()
            .ok_or_else(|| anyhow!("the sandbox's guest agent is not ready"))?;
        let what = format!("Running {argv:?} in the guest");
        agent
            .exec(
                guest_agent::protocol::ExecRequest {
                    argv,
                    timeout_ms: Some(60_000),
                },
                Duration::from_secs(70),
            )
            .await
            .context(what)
    }
}

/// A client of the guest agent at `address`, connected (not yet waited for).
pub async fn connect_agent(address: &AgentAddress) -> Result<AgentClient> {
    Ok(match address {
        AgentAddress::VirtioSerial { path } => AgentClient::connect_serial(path).await?,
        AgentAddress::Vsock { cid, port } => AgentClient::connect_vsock(*cid, *port).await?,
        AgentAddress::HybridVsock { path, port } => {
            AgentClient::connect_hybrid_vsock(path, *port).await?
        }
    })
}

/// Awaits `fut`, logging every 10 s that it is still going.
async fn progress<T>(log: &slog::Logger, what: &str, fut: impl Future<Output = T>) -> T {
    let began = Instant::now();
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => info!(log, "still {}", what; "elapsed_s" => began.elapsed().as_secs()),
        }
    }
}

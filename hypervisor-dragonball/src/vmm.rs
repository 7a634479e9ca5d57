//! Assembling a VM and running it: the build on a blocking thread, the event thread, the
//! vCPU threads, and teardown.
//!
//! Threads of one VM:
//!
//! - `db-vmm` (the event thread) owns the KVM VM fd, guest memory and devices. It enters
//!   the sandbox's network namespace first and opens the virtio devices' host backends
//!   there (TAPs), then waits (epoll) on the i8042 reset eventfd, on a wake eventfd paired
//!   with a channel of [`VmmEvent`]s (a stop request, a vCPU that returned), and on every
//!   virtio queue's ioeventfd and host backend fd, which it serves. The first of these decides the [`ExitReason`]; the thread then stops
//!   and joins the vCPUs, drops memory and fds, and records the [`VmExit`] in the VM's [`Lifecycle`].
//! - `db-vcpuN`, one per vCPU, each owning its vCPU fd (see [`crate::vcpu`]).
//!
//! The async facade never blocks on them: it sends commands and awaits oneshot/watch
//! channels the threads complete.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use hypervisor::{ExitReason, Lifecycle, VcpuFault, VcpuFaultKind, VmExit};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use slog::{info, warn};
use tokio::sync::oneshot;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot;
use crate::devices::Devices;
use crate::error::{DeviceError, Error, Result};
use crate::kvm;
use crate::memory::GuestRam;
use crate::vcpu::{self, Vcpu, VcpuCommand, VcpuExited, VcpuOutcome, VcpuSet};

/// Everything `start` needs to build a VM.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Kernel (ELF or bzImage).
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Console log file.
    pub console: PathBuf,
}

/// A built, not yet running VM.
pub struct Built {
    kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    devices: Devices,
    vcpus: Vec<VcpuFd>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Builds the VM: KVM, memory, devices (`virtio` in their windows), kernel and boot
/// structures, configured vCPUs. Blocking (file reads, ioctls); run it on a blocking thread.
pub fn build(
    plan: &BootPlan,
    virtio: Vec<(
        crate::boot::MmioWindow,
        Box<dyn crate::virtio::VirtioDevice>,
    )>,
    log: &slog::Logger,
) -> Result<Built> {
    let kvm = kvm::open(&plan.kvm_path)?;
    let vm = kvm::create_vm(&kvm, plan.vcpus)?;
    let ram = GuestRam::new(plan.mem_bytes)?;
    ram.register(&vm)?;
    let console = open_console(&plan.console)?;
    let devices = Devices::new(&kvm, &vm, console, &ram.mem, virtio, log)?;
    let info = boot::load(
        &ram.mem,
        &plan.kernel,
        plan.initrd.as_deref(),
        &plan.cmdline,
        plan.vcpus,
    )?;
    let desc = boot::setup_descriptors(&ram.mem)?;
    let mut vcpus = Vec::new();
    for index in 0..plan.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::kvm(format!("Creating vCPU {index}"), e))?;
        vcpu::configure(&kvm, &fd, index, plan.vcpus, &ram.mem, &info, &desc)?;
        vcpus.push(fd);
    }
    Ok(Built {
        kvm,
        vm,
        ram,
        devices,
        vcpus,
    })
}

fn open_console(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::File {
            step: "Opening the console log",
            path: path.to_path_buf(),
            source,
        })
}

/// What the event thread is told.
#[derive(Debug)]
pub enum VmmEvent {
    /// The runtime asked for the VM to stop.
    Stop,
    /// A vCPU thread returned.
    Vcpu(VcpuExited),
}

/// Sends [`VmmEvent`]s to the event thread and wakes it.
#[derive(Debug, Clone)]
pub struct VmmSender {
    tx: Sender<VmmEvent>,
    wake: Arc<EventFd>,
}

impl VmmSender {
    /// Sends `ev`; a finished event thread simply does not hear it.
    pub fn send(&self, ev: VmmEvent) {
        if self.tx.send(ev).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// A running VM's handles, held by the facade.
#[derive(Debug)]
pub struct RunningVm {
    /// To the event thread.
    pub events: VmmSender,
    /// The vCPU threads.
    pub vcpus: Arc<VcpuSet>,
    /// The event thread, joined on stop.
    pub event_thread: Option<JoinHandle<()>>,
    /// Thread id of the event thread.
    pub event_tid: u32,
    /// Thread ids of the vCPUs, by index.
    pub vcpu_tids: Vec<u32>,
}

impl Drop for RunningVm {
    /// The VM lives in this process: a handle that goes away (a cancelled start, a dropped
    /// backend) must not leave its threads running. The event thread tears down on its own.
    fn drop(&mut self) {
        self.events.send(VmmEvent::Stop);
    }
}

fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| Error::Thread { name, source })
}

/// Starts the event thread and the vCPU threads of `built`. Returns once every thread
/// reported its id, or with the error that kept the VM from starting (after tearing down
/// whatever had started).
pub async fn launch(
    built: Built,
    netns: Option<PathBuf>,
    life: Arc<Lifecycle>,
    log: slog::Logger,
) -> Result<RunningVm> {
    vcpu::install_kick_handler()?;
    let Built {
        kvm,
        vm,
        ram,
        devices,
        vcpus: vcpu_fds,
    } = built;
    let (tx, rx) = std::sync::mpsc::channel();
    let wake = Arc::new(
        EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "VMM wake",
            source,
        })?,
    );
    let events = VmmSender {
        tx,
        wake: wake.clone(),
    };
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for _ in &vcpu_fds {
        let (t, r) = std::sync::mpsc::channel::<VcpuCommand>();
        senders.push(t);
        receivers.push(r);
    }
    let vcpus = Arc::new(VcpuSet::new(senders));
    let io = devices.io.clone();

    let (ready_tx, ready_rx) = oneshot::channel();
    let ctx = EventLoop {
        kvm,
        vm,
        ram,
        devices,
        rx,
        wake,
        vcpus: vcpus.clone(),
        life,
        log: log.clone(),
    };
    let event_thread = spawn("db-vmm".into(), move || ctx.run(netns, ready_tx))?;
    // From here on, dropping `running` (an error below, or a cancelled start) stops the VM.
    let mut running = RunningVm {
        events,
        vcpus,
        event_thread: Some(event_thread),
        event_tid: 0,
        vcpu_tids: Vec::new(),
    };
    running.event_tid = match ready_rx.await {
        Ok(Ok(tid)) => tid,
        Ok(Err(e)) => {
            stop(&mut running).await;
            return Err(e);
        }
        Err(_) => {
            stop(&mut running).await;
            return Err(DeviceError::EventThreadEnded.into());
        }
    };

    // Spawn with the thread list locked, so a teardown racing with start-up (a vCPU that
    // fails at once) cannot miss a thread.
    let mut tids = Vec::new();
    let spawned: Result<()> = {
        let mut threads = running.vcpus.threads();
        let list = threads.as_mut().expect("no teardown before start-up ends");
        let mut result = Ok(());
        for (index, (fd, commands)) in vcpu_fds.into_iter().zip(receivers).enumerate() {
            let index = index as u8;
            let vcpu = Vcpu {
                index,
                fd,
                io: io.clone(),
                commands,
            };
            let (tid_tx, tid_rx) = oneshot::channel();
            let events = running.events.clone();
            match spawn(format!("db-vcpu{index}"), move || {
                let _ = tid_tx.send(gettid());
                // A bug in this thread must end the VM, not leave it half-running.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()))
                    .unwrap_or_else(|_| {
                        VcpuOutcome::Crashed(VcpuFault {
                            vcpu: u32::from(index),
                            kind: VcpuFaultKind::VmmFailure,
                            detail: "the vCPU thread panicked".into(),
                            rip: None,
                        })
                    });
                events.send(VmmEvent::Vcpu(VcpuExited { index, outcome }));
            }) {
                Ok(t) => {
                    list.push(t);
                    tids.push(tid_rx);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        result
    };
    if let Err(e) = spawned {
        warn!(log, "starting vCPU threads failed; stopping the VM"; "error" => %e);
        stop(&mut running).await;
        return Err(e);
    }
    for rx in tids {
        match rx.await {
            Ok(tid) => running.vcpu_tids.push(tid),
            Err(_) => running.vcpu_tids.push(0),
        }
    }
    Ok(running)
}

/// Asks the event thread to stop the VM and joins it once it has published the exit.
pub async fn stop(running: &mut RunningVm) {
    running.events.send(VmmEvent::Stop);
    if let Some(t) = running.event_thread.take() {
        join(t).await;
    }
}

async fn join(t: JoinHandle<()>) {
    // The thread is at most tearing down (joining vCPUs that were kicked): short.
    let _ = tokio::task::spawn_blocking(move || t.join()).await;
}

const TOKEN_RESET: u64 = 0;
const TOKEN_WAKE: u64 = 1;
/// Set in the epoll token of every virtio event: `1 << 32 | slot << 16 | kind << 12 | index`.
const TOKEN_VIRTIO: u64 = 1 << 32;
const KIND_QUEUE: u64 = 0;
const KIND_BACKEND: u64 = 1;

fn token(slot: usize, kind: u64, index: usize) -> u64 {
    TOKEN_VIRTIO | (slot as u64) << 16 | kind << 12 | (index as u64 & 0xfff)
}

fn decode_token(token: u64) -> (usize, u64, usize) {
    (
        ((token >> 16) & 0xffff) as usize,
        (token >> 12) & 0xf,
        (token & 0xfff) as usize,
    )
}

/// The event thread's state.
struct EventLoop {
    kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    devices: Devices,
    rx: Receiver<VmmEvent>,
    wake: Arc<EventFd>,
    vcpus: Arc<VcpuSet>,
    life: Arc<Lifecycle>,
    log: slog::Logger,
}

impl EventLoop {
    fn run(self, netns: Option<PathBuf>, ready: oneshot::Sender<Result<u32>>) {
        if let Some(ns) = &netns {
            if let Err(e) = enter_netns(ns) {
                let _ = ready.send(Err(e));
                return;
            }
        }
        for slot in &self.devices.virtio {
            if let Err(e) = slot.lock().device_mut().open_backend() {
                let _ = ready.send(Err(e));
                return;
            }
        }
        let _ = ready.send(Ok(gettid()));
        let reason = self.wait_for_exit();
        let EventLoop {
            kvm,
            vm,
            ram,
            devices,
            vcpus,
            life,
            log,
            ..
        } = self;
        // vCPU threads first (they use the VM and its memory), then the devices, the VM fd,
        // and the memory it mapped.
        vcpus.stop_and_join();
        devices.close_console();
        drop(devices);
        drop(vm);
        drop(ram);
        drop(kvm);
        let exit = VmExit {
            reason,
            code: None,
            signal: None,
        };
        info!(log, "VM exited"; "how" => exit.to_string());
        life.finish(exit);
    }

    fn wait_for_exit(&self) -> ExitReason {
        let epoll = match self.epoll() {
            Ok(e) => e,
            Err(e) => return ExitReason::Crashed(format!("VMM event loop: {e}")),
        };
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return ExitReason::Crashed(format!("VMM event loop: waiting: {e}")),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RESET => {
                        let _ = self.devices.reset.read();
                        info!(self.log, "the guest reset the i8042 controller");
                        return ExitReason::GuestShutdown;
                    }
                    token if token & TOKEN_VIRTIO != 0 => self.virtio_event(token),
                    _ => {
                        let _ = self.wake.read();
                        while let Ok(ev) = self.rx.try_recv() {
                            if let Some(reason) = self.exit_reason(ev) {
                                return reason;
                            }
                        }
                    }
                }
            }
        }
    }

    fn exit_reason(&self, ev: VmmEvent) -> Option<ExitReason> {
        match ev {
            VmmEvent::Stop => Some(ExitReason::Stopped),
            VmmEvent::Vcpu(VcpuExited { index, outcome }) => match outcome {
                VcpuOutcome::GuestShutdown => Some(ExitReason::GuestShutdown),
                VcpuOutcome::Crashed(fault) => {
                    warn!(self.log, "vCPU failed"; "vcpu" => index, "error" => %fault);
                    Some(ExitReason::VcpuFault(fault))
                }
                VcpuOutcome::Stopped => Some(ExitReason::Crashed(format!(
                    "vCPU {index}: its thread returned without being asked"
                ))),
            },
        }
    }

    /// Serves a virtio queue notification or backend readiness.
    fn virtio_event(&self, token: u64) {
        let (slot, kind, index) = decode_token(token);
        let Some(slot) = self.devices.virtio.get(slot) else {
            return;
        };
        if kind == KIND_QUEUE {
            // Drain the counter first: a kick arriving while the queue is served then
            // wakes us again, so none is lost.
            let _ = slot.notify[index].read();
            slot.lock().queue_event(index);
        } else {
            slot.lock().backend_event(index);
        }
    }

    fn epoll(&self) -> std::io::Result<Epoll> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.devices.reset.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_RESET),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        for (n, slot) in self.devices.virtio.iter().enumerate() {
            for (q, fd) in slot.notify.iter().enumerate() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(n, KIND_QUEUE, q)),
                )?;
            }
            let backend = slot.lock().device().backend_fds();
            for (i, (fd, set)) in backend.into_iter().enumerate() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(set, token(n, KIND_BACKEND, i)),
                )?;
            }
        }
        Ok(epoll)
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<()> {
    let err = |source| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    netdev::netns::enter(f.as_fd()).map_err(err)
}

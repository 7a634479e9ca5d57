//! vCPUs: configuration for the 64-bit boot entry, and one named host thread per vCPU
//! looping on `KVM_RUN`.
//!
//! A vCPU thread takes [`VcpuCommand`]s on a channel. To make it look at the channel while
//! it is inside `KVM_RUN` (or about to enter it), the sender *kicks* it: a real-time signal
//! whose handler sets `immediate_exit` in the thread's own `kvm_run` page, so `KVM_RUN`
//! returns `EINTR` now or on its next entry, and no kick is lost. A paused vCPU parks on
//! its channel, out of `KVM_RUN`, until `Resume` or `Stop`.
//!
//! An exit the VMM cannot handle (triple fault, KVM internal or emulation error, failed
//! entry) ends the thread with a [`VcpuFault`] naming the exit and carrying the guest RIP;
//! the event thread then stops the whole VM and reports it as [`hypervisor::ExitReason::VcpuFault`].
//! Nothing here panics on guest behaviour.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use dbs_arch::cpuid::{process_cpuid, VmSpec, VpmuFeatureLevel};
use dbs_device::device_manager::IoManager;
use hypervisor::{VcpuFault, VcpuFaultKind};
use kvm_bindings::{kvm_run, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{BootInfo, Descriptors};
use crate::devices;
use crate::error::{Error, Result, VcpuError};
use crate::memory::GuestMem;

/// Offset from `SIGRTMIN` of the signal that kicks vCPU threads out of `KVM_RUN`.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// `KVM_SYSTEM_EVENT_SHUTDOWN`, `_RESET` and `_CRASH`.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 5;
/// `KVM_INTERNAL_ERROR_EMULATION`.
const INTERNAL_ERROR_EMULATION: u32 = 1;

/// The kick signal number.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// What a vCPU thread is told.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN`, acknowledge, and park until `Resume` or `Stop`.
    Pause(tokio::sync::oneshot::Sender<()>),
    /// Continue after `Pause`.
    Resume,
    /// Return from the thread.
    Stop,
}

/// How a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuOutcome {
    /// Told to stop.
    Stopped,
    /// The guest asked KVM for a shutdown or reset (`KVM_EXIT_SYSTEM_EVENT`).
    GuestShutdown,
    /// An exit the VMM cannot handle.
    Crashed(VcpuFault),
}

/// Sent to the event thread when a vCPU thread returns.
#[derive(Debug)]
pub struct VcpuExited {
    /// vCPU index.
    pub index: u8,
    /// Why it returned.
    pub outcome: VcpuOutcome,
}

/// Writes the CPUID, MSRs, registers, FPU, segments and LAPIC LINT setup of vCPU `index`
/// of `count` for entry at `boot.entry` in 64-bit mode with RSI pointing at the zero page.
pub fn configure(
    kvm: &Kvm,
    fd: &VcpuFd,
    index: u8,
    count: u8,
    mem: &GuestMem,
    boot: &BootInfo,
    desc: &Descriptors,
) -> Result<()> {
    let fail = |source: VcpuError| Error::VcpuSetup { index, source };
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| fail(VcpuError::SupportedCpuid(e)))?;
    let spec = VmSpec::new(index, count, 1, count, 1, VpmuFeatureLevel::Disabled)
        .map_err(|e| fail(VcpuError::Topology(e)))?;
    process_cpuid(&mut cpuid, &spec).map_err(|e| fail(VcpuError::FilterCpuid(e)))?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| fail(VcpuError::SetCpuid(e)))?;
    dbs_arch::regs::setup_msrs(fd).map_err(|e| fail(VcpuError::Msrs(e)))?;
    let sp = dbs_boot::layout::BOOT_STACK_POINTER;
    dbs_arch::regs::setup_regs(fd, boot.entry, sp, sp, boot.zero_page)
        .map_err(|e| fail(VcpuError::Regs(e)))?;
    dbs_arch::regs::setup_fpu(fd).map_err(|e| fail(VcpuError::Fpu(e)))?;
    dbs_arch::regs::setup_sregs(mem, fd, desc.pml4, &desc.gdt, desc.gdt_addr, desc.idt_addr)
        .map_err(|e| fail(VcpuError::Sregs(e)))?;
    dbs_arch::interrupts::set_lint(fd).map_err(|e| fail(VcpuError::Lint(e)))?;
    Ok(())
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let page = KVM_RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: the pointer is set only by `Vcpu::run` on this same thread, to the
        // kvm_run mapping of the `VcpuFd` that thread owns, and cleared before that fd is
        // dropped; the handler runs on that thread, so the page is mapped. Writing one
        // byte with a volatile store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*page).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), vmm_sys_util::errno::Error>> =
        OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), kick_handler));
    installed.map_err(|source| Error::VcpuSetup {
        index: 0,
        source: VcpuError::KickHandler {
            signal: kick_signal(),
            source,
        },
    })
}

/// The vCPU threads of one VM: their command channels and join handles.
#[derive(Debug)]
pub struct VcpuSet {
    commands: Vec<Sender<VcpuCommand>>,
    /// `None` once the threads have been joined: they must not be kicked after that.
    threads: Mutex<Option<Vec<JoinHandle<()>>>>,
}

impl VcpuSet {
    /// A set for threads that will read `commands`' receivers.
    pub fn new(commands: Vec<Sender<VcpuCommand>>) -> Self {
        VcpuSet {
            commands,
            threads: Mutex::new(Some(Vec::new())),
        }
    }

    /// The thread list, locked: spawners hold it so teardown cannot miss a thread.
    pub fn threads(&self) -> std::sync::MutexGuard<'_, Option<Vec<JoinHandle<()>>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one command per vCPU, made by `make`, and kicks every thread.
    pub fn send_all(&self, mut make: impl FnMut() -> VcpuCommand) {
        for tx in &self.commands {
            // A thread that has returned dropped its receiver; nothing to tell it.
            let _ = tx.send(make());
        }
        self.kick();
    }

    /// Sends `Resume` to every vCPU. Parked threads wait on their channel, so no kick.
    pub fn resume(&self) {
        for tx in &self.commands {
            let _ = tx.send(VcpuCommand::Resume);
        }
    }

    fn kick(&self) {
        if let Some(threads) = self.threads().as_ref() {
            for t in threads {
                // ESRCH for a thread that already returned is fine.
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Stops every vCPU thread and joins it.
    pub fn stop_and_join(&self) {
        self.send_all(|| VcpuCommand::Stop);
        let threads = self.threads().take().unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One vCPU, moved into its thread.
pub struct Vcpu {
    /// Index (also its APIC id).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port and MMIO dispatch.
    pub io: Arc<IoManager>,
    /// Commands from the VMM.
    pub commands: Receiver<VcpuCommand>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// What one exit asks of the loop.
enum Step {
    Continue,
    Interrupted,
    Exit(VcpuOutcome),
    InternalError,
    Crash(VcpuFaultKind, String),
}

impl Vcpu {
    /// The thread body: runs the vCPU until it is stopped or fails.
    pub fn run(self) -> VcpuOutcome {
        let Vcpu {
            index,
            mut fd,
            io,
            commands,
        } = self;
        let page: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN_PAGE.with(|c| c.set(page));
        let outcome = run_loop(index, &fd, page, &io, &commands);
        KVM_RUN_PAGE.with(|c| c.set(std::ptr::null_mut()));
        outcome
    }
}

/// Handles queued commands; `Some` when the thread must return.
fn take_commands(commands: &Receiver<VcpuCommand>) -> Option<VcpuOutcome> {
    loop {
        match commands.try_recv() {
            Ok(VcpuCommand::Pause(ack)) => {
                let _ = ack.send(());
                // Parked: block on the channel until told to go on.
                loop {
                    match commands.recv() {
                        Ok(VcpuCommand::Resume) => break,
                        Ok(VcpuCommand::Pause(ack)) => {
                            let _ = ack.send(());
                        }
                        Ok(VcpuCommand::Stop) | Err(_) => return Some(VcpuOutcome::Stopped),
                    }
                }
            }
            Ok(VcpuCommand::Resume) => {}
            Ok(VcpuCommand::Stop) | Err(TryRecvError::Disconnected) => {
                return Some(VcpuOutcome::Stopped)
            }
            Err(TryRecvError::Empty) => return None,
        }
    }
}

fn run_loop(
    index: u8,
    fd: &VcpuFd,
    page: *const kvm_run,
    io: &IoManager,
    commands: &Receiver<VcpuCommand>,
) -> VcpuOutcome {
    loop {
        if let Some(outcome) = take_commands(commands) {
            return outcome;
        }
        let step = match fd.run() {
            Ok(exit) => handle_exit(io, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
            Err(e) => Step::Crash(VcpuFaultKind::RunFailed, format!("KVM_RUN failed: {e}")),
        };
        match step {
            Step::Continue => {}
            Step::Interrupted => fd.set_kvm_immediate_exit(0),
            Step::Exit(outcome) => return outcome,
            Step::InternalError => {
                let (kind, detail) = internal_error(page);
                return crashed(index, fd, kind, detail);
            }
            Step::Crash(kind, detail) => return crashed(index, fd, kind, detail),
        }
    }
}

fn crashed(index: u8, fd: &VcpuFd, kind: VcpuFaultKind, detail: String) -> VcpuOutcome {
    VcpuOutcome::Crashed(VcpuFault {
        vcpu: u32::from(index),
        kind,
        detail,
        rip: fd.get_regs().ok().map(|r| r.rip),
    })
}

fn handle_exit(io: &IoManager, exit: VcpuExit<'_>) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => devices::pio_read(io, port, data),
        VcpuExit::IoOut(port, data) => devices::pio_write(io, port, data),
        VcpuExit::MmioRead(addr, data) => devices::mmio_read(io, addr, data),
        VcpuExit::MmioWrite(addr, data) => devices::mmio_write(io, addr, data),
        VcpuExit::Intr => return Step::Interrupted,
        VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {}
        VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN | SYSTEM_EVENT_RESET, _) => {
            return Step::Exit(VcpuOutcome::GuestShutdown)
        }
        VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH, _) => {
            return Step::Crash(
                VcpuFaultKind::GuestCrash,
                "KVM_EXIT_SYSTEM_EVENT (guest crash)".into(),
            )
        }
        VcpuExit::SystemEvent(ty, flags) => {
            return Step::Crash(
                VcpuFaultKind::UnhandledExit,
                format!("KVM_EXIT_SYSTEM_EVENT type {ty} flags {flags:#x}"),
            )
        }
        VcpuExit::Shutdown => {
            return Step::Crash(
                VcpuFaultKind::TripleFault,
                "KVM_EXIT_SHUTDOWN (triple fault)".into(),
            )
        }
        VcpuExit::InternalError => return Step::InternalError,
        VcpuExit::FailEntry(reason, cpu) => {
            return Step::Crash(
                VcpuFaultKind::EntryFailure,
                format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x} on host CPU {cpu})"),
            )
        }
        VcpuExit::Hlt => {
            return Step::Crash(
                VcpuFaultKind::UnhandledExit,
                "KVM_EXIT_HLT (unexpected with the in-kernel LAPIC)".into(),
            )
        }
        VcpuExit::Unsupported(n) => {
            return Step::Crash(
                VcpuFaultKind::UnhandledExit,
                format!("unsupported KVM exit {n}"),
            )
        }
        other => {
            return Step::Crash(
                VcpuFaultKind::UnhandledExit,
                format!("unhandled KVM exit {other:?}"),
            )
        }
    }
    Step::Continue
}

fn internal_error(page: *const kvm_run) -> (VcpuFaultKind, String) {
    // SAFETY: `page` is the kvm_run mapping of the vCPU whose `KVM_RUN` just returned
    // KVM_EXIT_INTERNAL_ERROR on this thread, so it is mapped and the kernel filled the
    // `internal` member of the exit union, which is plain old data copied out here.
    let internal = unsafe { std::ptr::addr_of!((*page).__bindgen_anon_1.internal).read() };
    let (suberror, ndata, data) = (internal.suberror, internal.ndata, internal.data);
    let what = match suberror {
        INTERNAL_ERROR_EMULATION => "emulation failure",
        2 => "simultaneous exception",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    let n = (ndata as usize).min(data.len());
    let data: Vec<String> = data[..n].iter().map(|d| format!("{d:#x}")).collect();
    let kind = if suberror == INTERNAL_ERROR_EMULATION {
        VcpuFaultKind::EmulationFailure
    } else {
        VcpuFaultKind::InternalError
    };
    let detail = format!(
        "KVM_EXIT_INTERNAL_ERROR ({what}, suberror {suberror}, data [{}])",
        data.join(", ")
    );
    (kind, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_signal_is_a_real_time_signal() {
        let s = kick_signal();
        assert!(s >= libc::SIGRTMIN() && s <= libc::SIGRTMAX(), "{s}");
    }

    #[test]
    fn a_parked_vcpu_returns_on_stop_and_acks_pause() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, mut ack_rx) = tokio::sync::oneshot::channel();
        tx.send(VcpuCommand::Pause(ack_tx)).unwrap();
        tx.send(VcpuCommand::Stop).unwrap();
        assert!(matches!(take_commands(&rx), Some(VcpuOutcome::Stopped)));
        assert!(ack_rx.try_recv().is_ok());
    }

    #[test]
    fn resume_after_pause_goes_back_to_running() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, _ack_rx) = tokio::sync::oneshot::channel();
        tx.send(VcpuCommand::Pause(ack_tx)).unwrap();
        tx.send(VcpuCommand::Resume).unwrap();
        assert!(take_commands(&rx).is_none());
    }
}

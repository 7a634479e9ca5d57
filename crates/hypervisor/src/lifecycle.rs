//! The lifecycle record every backend shares: the VM's state, its VMM's pids, how it ended,
//! and the stop requests under way.
//!
//! A [`Lifecycle`] lives in an `Arc` shared between the [`Vm`](crate::vm::Vm) that drives the
//! backend and whatever watches the VMM (a task reaping a child process, a VMM event thread).
//! The rules it keeps, for every backend alike:
//!
//! - transitions are compare-and-set ([`transition`](Lifecycle::transition)): an operation
//!   that finishes after the VMM exited never moves the VM out of `Stopped`;
//! - nothing leaves `Stopped` ([`set_state`](Lifecycle::set_state));
//! - the first recorded exit wins ([`finish`](Lifecycle::finish)), so the watcher's account of
//!   a VMM's death is not overwritten by a later, vaguer one;
//! - a `stop` counts itself before it waits for the operation lock, and the operation holding
//!   the lock gives up at its next await ([`unless_stopping`](Lifecycle::unless_stopping)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Error;
use crate::state::{Operation, VmState};
use crate::{ExitReason, VmExit, VmmPids};

/// Why an operation gave up: a `stop` is under way.
pub const STOPPING: &str = "the VM is stopping";

#[derive(Debug)]
struct Status {
    state: VmState,
    pids: Option<VmmPids>,
}

/// State, pids and exit of one VM. See the module docs.
#[derive(Debug)]
pub struct Lifecycle {
    status: Mutex<Status>,
    exit: watch::Sender<Option<VmExit>>,
    stopping: AtomicBool,
    stop_requests: watch::Sender<u32>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new(VmState::Created)
    }
}

impl Lifecycle {
    /// A record in `state` (`Created` for a new VM; `Running` or `Paused` for one re-attached
    /// after a runtime restart).
    pub fn new(state: VmState) -> Self {
        Lifecycle {
            status: Mutex::new(Status { state, pids: None }),
            exit: watch::channel(None).0,
            stopping: AtomicBool::new(false),
            stop_requests: watch::channel(0).0,
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.status().state
    }

    /// Sets `state`, except that nothing leaves `Stopped`. Returns whether the state is now
    /// `state`.
    pub fn set_state(&self, state: VmState) -> bool {
        let mut st = self.status();
        if st.state == VmState::Stopped && state != VmState::Stopped {
            return false;
        }
        st.state = state;
        true
    }

    /// Compare-and-set: moves from `from` to `to` only if the state is still `from`. Returns
    /// whether it moved.
    pub fn transition(&self, from: VmState, to: VmState) -> bool {
        let mut st = self.status();
        if st.state != from {
            return false;
        }
        st.state = to;
        true
    }

    /// The VMM's pids, once it runs.
    pub fn pids(&self) -> Option<VmmPids> {
        self.status().pids.clone()
    }

    /// Records the VMM's pids.
    pub fn set_pids(&self, pids: VmmPids) {
        self.status().pids = Some(pids);
    }

    /// Records how the VM ended: the state becomes `Stopped`, and `exit` is what
    /// [`wait_exit`](Self::wait_exit) returns unless an exit was recorded before.
    pub fn finish(&self, exit: VmExit) {
        self.set_state(VmState::Stopped);
        self.exit.send_if_modified(|current| {
            let unset = current.is_none();
            if unset {
                *current = Some(exit);
            }
            unset
        });
    }

    /// How the VM ended, if it did.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Waits until the VM ended and tells how.
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .expect("the sender lives in self");
        exit.clone().expect("waited for Some")
    }

    /// The VM's exit, waiting at most `limit` for one to be recorded.
    pub async fn exit_within(&self, limit: Duration) -> Option<VmExit> {
        tokio::time::timeout(limit, self.wait_exit()).await.ok()
    }

    /// Whether the runtime asked the VM to stop: an exit seen now is the one it asked for.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Marks the VM as being stopped by the runtime.
    pub(crate) fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Counts one `stop` under way for as long as the returned guard lives.
    pub(crate) fn stop_requested(&self) -> StopRequest<'_> {
        self.stop_requests.send_modify(|n| *n += 1);
        StopRequest(self)
    }

    /// Runs `op` unless a `stop` is (or comes) under way: then `op` is dropped at its next
    /// await and the call fails with `stopping()`. Operations are written to be cancel-safe
    /// at their awaits; the VM is about to stop anyway.
    pub async fn unless_stopping<T>(
        &self,
        op: impl std::future::Future<Output = crate::Result<T>>,
        stopping: impl FnOnce() -> Error,
    ) -> crate::Result<T> {
        let mut stop = self.stop_requests.subscribe();
        tokio::select! {
            biased;
            _ = stop.wait_for(|n| *n > 0) => Err(stopping()),
            r = op => r,
        }
    }

    /// The error for `op` refused in the current state: the VMM's exit when it ended on its
    /// own, else [`Error::InvalidState`].
    pub fn exited_or_state(&self, op: Operation) -> Error {
        let state = self.state();
        match self.exit() {
            // A stop the runtime asked for is a state, not a surprise.
            Some(exit) if state == VmState::Stopped && exit.reason != ExitReason::Stopped => {
                Error::VmmExited(exit)
            }
            _ => Error::InvalidState {
                operation: op,
                state,
            },
        }
    }

    /// The state after `op`, or why `op` is refused now (see
    /// [`exited_or_state`](Self::exited_or_state)).
    pub fn check(&self, op: Operation) -> crate::Result<VmState> {
        self.state().next(op).map_err(|_| self.exited_or_state(op))
    }
}

/// One `stop` under way, counted for as long as it lives (a dropped stop takes its count back).
#[derive(Debug)]
pub(crate) struct StopRequest<'a>(&'a Lifecycle);

impl Drop for StopRequest<'_> {
    fn drop(&mut self) {
        self.0.stop_requests.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(reason: ExitReason) -> VmExit {
        VmExit {
            reason,
            code: None,
            signal: None,
        }
    }

    #[test]
    fn nothing_leaves_stopped_and_transitions_compare_first() {
        let life = Lifecycle::default();
        assert!(life.transition(VmState::Created, VmState::Prepared));
        assert!(!life.transition(VmState::Created, VmState::Running));
        life.finish(exit(ExitReason::GuestShutdown));
        assert!(!life.set_state(VmState::Running));
        assert!(!life.transition(VmState::Prepared, VmState::Running));
        assert_eq!(life.state(), VmState::Stopped);
    }

    #[test]
    fn the_first_exit_recorded_wins() {
        let life = Lifecycle::default();
        life.finish(exit(ExitReason::Killed));
        life.finish(exit(ExitReason::Stopped));
        assert_eq!(life.exit().unwrap().reason, ExitReason::Killed);
    }

    #[test]
    fn a_refused_operation_reports_an_unexpected_exit_not_the_state() {
        let life = Lifecycle::new(VmState::Running);
        assert!(matches!(
            life.check(Operation::Start),
            Err(Error::InvalidState { .. })
        ));
        life.finish(exit(ExitReason::Crashed("boom".into())));
        assert!(matches!(
            life.check(Operation::Pause),
            Err(Error::VmmExited(_))
        ));
        let stopped = Lifecycle::new(VmState::Running);
        stopped.finish(exit(ExitReason::Stopped));
        assert!(matches!(
            stopped.check(Operation::Pause),
            Err(Error::InvalidState { .. })
        ));
    }

    #[tokio::test]
    async fn a_stop_request_ends_an_operation_at_its_next_await() {
        let life = Lifecycle::default();
        let _stop = life.stop_requested();
        let r: crate::Result<()> = life
            .unless_stopping(std::future::pending(), || {
                Error::backend("Waiting", STOPPING)
            })
            .await;
        assert_eq!(r.unwrap_err().to_string(), "Waiting");
    }

    #[tokio::test]
    async fn a_dropped_stop_request_lets_operations_run() {
        let life = Lifecycle::default();
        drop(life.stop_requested());
        let r = life
            .unless_stopping(async { Ok(7) }, || Error::backend("Waiting", STOPPING))
            .await;
        assert_eq!(r.unwrap(), 7);
    }
}

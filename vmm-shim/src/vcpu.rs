//! A vCPU's thread and the handle that controls it, in the manner of
//! Firecracker's `VcpuHandle` / `VcpuEvent`: the supervisor sends a
//! [`VcpuEvent`] over the vCPU's channel and kicks its thread out of
//! KVM_RUN; the vCPU acts on it before it next enters the guest and answers
//! over a channel shared by every vCPU of the run ([`VcpuMessage`]). A held
//! vCPU blocks on its channel; nothing is polled and nothing sleeps.
//!
//! A vCPU thread always says how it ended, also when it panics: the
//! supervisor counts on that to know when a VM has stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::exits::{AccessTimes, DeviceCount, ExitStats};
use crate::kvm::{Entry, KvmError, RunStats, Vcpu, VcpuState};

/// What one vCPU did.
#[derive(Debug)]
pub struct VcpuReport {
    pub vcpu: u16,
    /// How it ended: the run counters (with the guest's exit code) or why it stopped.
    pub result: Result<RunStats, String>,
    pub reports: Vec<u32>,
    pub exits: ExitStats,
    pub per_device: Vec<DeviceCount>,
    /// Access times per target, parallel to `per_device`.
    pub device_times: Vec<AccessTimes>,
    /// Nanoseconds between successive exits, if asked for.
    pub exit_times: Option<Histogram<u64>>,
    pub elapsed: Duration,
}

impl VcpuReport {
    /// A vCPU that failed before (or without) running.
    pub fn failed(vcpu: u16, why: String) -> VcpuReport {
        VcpuReport {
            vcpu,
            result: Err(why),
            reports: Vec::new(),
            exits: ExitStats::default(),
            per_device: Vec::new(),
            device_times: Vec::new(),
            exit_times: None,
            elapsed: Duration::ZERO,
        }
    }
}

/// What the supervisor asks of a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stay out of the guest once the exit being served is finished (an
    /// access in flight completes first); with `save`, save the
    /// architectural state too.
    Pause { save: bool },
    /// Enter the guest again.
    Resume,
    /// End the run cleanly (shut down, migrated, reset).
    End,
    /// End the run with this error (the run limit, Ctrl-C, another vCPU failed).
    Fail(String),
}

/// What a vCPU tells the supervisor.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Held outside the guest, with its state if it was asked to save it.
    Paused(Option<Result<Box<VcpuState>, KvmError>>),
    /// Its thread ended: what it did and how it ended.
    Exited(Box<VcpuReport>),
}

/// A vCPU's response, with whose it is.
#[derive(Debug)]
pub struct VcpuMessage {
    pub vm: u32,
    pub vcpu: u16,
    pub response: VcpuResponse,
}

/// Where the supervisor has a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Asked to pause, not yet held.
    Pausing,
    Paused,
    Exited,
}

/// The supervisor's end of a vCPU.
#[derive(Debug)]
pub struct VcpuHandle {
    pub vm: u32,
    pub index: u16,
    pub state: RunState,
    events: Sender<VcpuEvent>,
    /// Set when the vCPU is told to end: a remote access it waits on gives up.
    stopping: Arc<AtomicBool>,
    /// Joined when the supervisor is done with it (its pthread_t is valid till then).
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The vCPU thread's end: the events it acts on before each entry.
#[derive(Debug)]
pub struct VcpuEvents {
    vm: u32,
    vcpu: u16,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuMessage>,
    paused: bool,
}

impl VcpuEvents {
    fn respond(&self, response: VcpuResponse) {
        let _ = self.responses.send(VcpuMessage { vm: self.vm, vcpu: self.vcpu, response });
    }

    /// What to do before the next entry into the guest: act on the events
    /// that came, and while held, wait for the next one.
    pub fn before_entry(&mut self, vcpu: &mut Vcpu) -> Entry {
        loop {
            let event = if self.paused { self.events.recv().ok() } else { self.events.try_recv().ok() };
            let Some(event) = event else {
                return match self.paused {
                    false => Entry::Run,
                    // The supervisor is gone while this vCPU was held.
                    true => Entry::Fail(KvmError::Stopped("the supervisor went away".into())),
                };
            };
            match event {
                VcpuEvent::Pause { save } => {
                    if !self.paused {
                        vcpu.finish_pending_io();
                        self.paused = true;
                    }
                    let saved = save.then(|| vcpu.save().map(Box::new));
                    self.respond(VcpuResponse::Paused(saved));
                }
                VcpuEvent::Resume => self.paused = false,
                VcpuEvent::End => return Entry::End,
                VcpuEvent::Fail(why) => return Entry::Fail(KvmError::Stopped(why)),
            }
        }
    }
}

/// The panic's message, as far as it has one.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl VcpuHandle {
    /// Start vCPU `index` of VM `vm` on a thread named `dmf-vcpu-<vm>.<index>`
    /// running `body` with its events — held before it first enters the
    /// guest if `held`; its end (a panic included) reaches `responses` as
    /// [`VcpuResponse::Exited`].
    pub fn spawn<F>(
        vm: u32,
        index: u16,
        held: bool,
        responses: Sender<VcpuMessage>,
        body: F,
    ) -> std::io::Result<VcpuHandle>
    where
        F: FnOnce(&mut VcpuEvents, &Arc<AtomicBool>) -> VcpuReport + Send + 'static,
    {
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        if held {
            // Queued before the thread runs: it never enters the guest first.
            let _ = events_tx.send(VcpuEvent::Pause { save: false });
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = std::thread::Builder::new().name(format!("dmf-vcpu-{vm}.{index}")).spawn(move || {
            let mut events = VcpuEvents { vm, vcpu: index, events: events_rx, responses, paused: false };
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut events, &flag)))
                .unwrap_or_else(|p| {
                    VcpuReport::failed(index, format!("vCPU {index} panicked: {}", panic_message(p.as_ref())))
                });
            events.respond(VcpuResponse::Exited(Box::new(report)));
        })?;
        let state = if held { RunState::Pausing } else { RunState::Running };
        Ok(VcpuHandle { vm, index, state, events: events_tx, stopping, thread: Some(thread) })
    }

    /// Send `event` and kick the vCPU out of the guest to take it.
    pub fn send(&mut self, event: VcpuEvent) {
        if self.state == RunState::Exited {
            return;
        }
        match &event {
            VcpuEvent::Pause { .. } if self.state == RunState::Running => self.state = RunState::Pausing,
            VcpuEvent::Resume => self.state = RunState::Running,
            VcpuEvent::End | VcpuEvent::Fail(_) => self.stopping.store(true, Ordering::Release),
            _ => {}
        }
        let _ = self.events.send(event);
        self.kick();
    }

    fn kick(&self) {
        if let Some(t) = self.thread.as_ref().filter(|t| !t.is_finished()) {
            crate::kvm::kick(t);
        }
    }

    /// Wait for the thread (it has said it exited).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.send(VcpuEvent::Fail("the supervisor went away".into()));
            self.join();
        }
    }
}

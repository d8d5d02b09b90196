//! State shared between a [`VmHandle`](super::VmHandle) and its vCPU threads.
//!
//! Hot-path checks (stop, pause, halt probe) are atomics read once per exit; everything that
//! waits uses one mutex and condition variable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ExitReason;
use crate::hypervisor::VcpuKick;

pub(super) struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Generation of the current halt probe; 0 = none asked yet.
    probe: AtomicU64,
    inner: Mutex<Inner>,
    cv: Condvar,
    vcpus: u32,
}

struct Inner {
    exit: Option<ExitReason>,
    /// vCPU threads parked because of a pause.
    parked: u32,
    /// vCPU threads that left their run loop.
    finished: u32,
    kickers: Vec<Arc<dyn VcpuKick>>,
    /// Per vCPU: (probe generation answered, halted for good).
    probe_answers: Vec<(u64, bool)>,
}

impl Control {
    pub fn new(vcpus: u32) -> Self {
        Control {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            probe: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                exit: None,
                parked: 0,
                finished: 0,
                kickers: Vec::new(),
                probe_answers: vec![(0, false); vcpus as usize],
            }),
            cv: Condvar::new(),
            vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_kickers(&self, kickers: Vec<Arc<dyn VcpuKick>>) {
        self.lock().kickers = kickers;
    }

    fn kick_all(inner: &Inner) {
        for k in &inner.kickers {
            k.kick();
        }
    }

    /// Ends the VM with `reason` unless it already ended; the first reason wins.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut inner = self.lock();
        if inner.exit.is_none() {
            log::debug!("VM exit requested: {reason}");
            inner.exit = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        Self::kick_all(&inner);
        self.cv.notify_all();
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// vCPU side: called when the thread leaves its run loop.
    pub fn vcpu_finished(&self) {
        self.lock().finished += 1;
        self.cv.notify_all();
    }

    /// vCPU side: parks while a pause is in effect. Returns at once if none is.
    pub fn park_while_paused(&self) {
        if !self.pause.load(Ordering::SeqCst) {
            return;
        }
        let mut inner = self.lock();
        inner.parked += 1;
        self.cv.notify_all();
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            inner = self.cv.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        inner.parked -= 1;
    }

    /// Handle side: stops guest execution; returns once every vCPU thread is parked (or the
    /// VM ended). Returns whether the VM is paused.
    pub fn pause(&self) -> bool {
        let mut inner = self.lock();
        if inner.exit.is_some() {
            return false;
        }
        self.pause.store(true, Ordering::SeqCst);
        Self::kick_all(&inner);
        while inner.exit.is_none() && inner.parked + inner.finished < self.vcpus {
            inner = self.cv.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        inner.exit.is_none()
    }

    /// Handle side: lets parked vCPUs run again.
    pub fn resume(&self) {
        let _inner = self.lock();
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// vCPU side: the probe generation this vCPU still has to answer, if any.
    pub fn pending_probe(&self, last_answered: u64) -> Option<u64> {
        let g = self.probe.load(Ordering::Acquire);
        (g != last_answered).then_some(g)
    }

    /// vCPU side: answers probe `generation`.
    pub fn answer_probe(&self, vcpu: u32, generation: u64, halted_for_good: bool) {
        let mut inner = self.lock();
        if let Some(a) = inner.probe_answers.get_mut(vcpu as usize) {
            *a = (generation, halted_for_good);
        }
        self.cv.notify_all();
    }

    /// Handle side: asks every vCPU whether it is halted for good, waiting at most `timeout`
    /// for the answers. Ends the VM with [`ExitReason::Halted`] if all are.
    pub fn probe_halted(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        if inner.exit.is_some() || self.pause.load(Ordering::SeqCst) {
            return;
        }
        let generation = self.probe.fetch_add(1, Ordering::AcqRel) + 1;
        Self::kick_all(&inner);
        loop {
            if inner.exit.is_some() || self.pause.load(Ordering::SeqCst) {
                return;
            }
            let answered = inner
                .probe_answers
                .iter()
                .filter(|(g, _)| *g >= generation)
                .count();
            if answered == self.vcpus as usize {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            inner = self
                .cv
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if inner.probe_answers.iter().all(|(_, halted)| *halted) {
            drop(inner);
            self.request_exit(ExitReason::Halted);
        }
    }

    /// Handle side: waits until the VM ended or `timeout` passed (forever if `None`), probing
    /// for a final halt every `probe_every`. Returns the exit reason if it ended.
    pub fn wait_exit(
        &self,
        timeout: Option<Duration>,
        probe_every: Option<Duration>,
    ) -> Option<ExitReason> {
        let start = Instant::now();
        let mut last_probe = start;
        loop {
            let mut slice = probe_every.unwrap_or(Duration::from_secs(3600));
            if let Some(t) = timeout {
                let elapsed = start.elapsed();
                if elapsed >= t {
                    return self.exit_reason();
                }
                slice = slice.min(t - elapsed);
            }
            {
                let inner = self.lock();
                if let Some(e) = &inner.exit {
                    return Some(e.clone());
                }
                let (inner, _) = self
                    .cv
                    .wait_timeout(inner, slice)
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(e) = &inner.exit {
                    return Some(e.clone());
                }
            }
            if let Some(every) = probe_every {
                if last_probe.elapsed() >= every {
                    last_probe = Instant::now();
                    self.probe_halted(every.min(Duration::from_millis(100)));
                }
            }
        }
    }
}

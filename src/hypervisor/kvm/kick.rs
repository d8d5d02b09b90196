//! Kicking a vCPU out of `KVM_RUN` from another thread.
//!
//! Two parts, because either alone races: `kvm_run.immediate_exit = 1` makes the *next*
//! `KVM_RUN` return at once (covers a kick that lands just before the vCPU enters the kernel),
//! and a signal to the vCPU thread interrupts a `KVM_RUN` already in progress (including a
//! guest halted inside the kernel). The signal handler does nothing; its only effect is the
//! `EINTR`.

use std::sync::{Mutex, Once};

use crate::hypervisor::VcpuKick;

/// The signal used to interrupt vCPU threads: the first real-time signal, which libc leaves
/// to applications. Its handler is installed once per process and does nothing.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs the no-op handler for [`kick_signal`] (without `SA_RESTART`, so `KVM_RUN` returns
/// `EINTR`) and unblocks it for the calling thread.
pub fn prepare_thread() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an `extern "C"` function that touches nothing, so it is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                log::error!(
                    "cannot install the vCPU kick signal handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
    // SAFETY: plain libc calls on a local, initialized signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// What a kick needs to reach one vCPU. Cleared when the vCPU is dropped, so a kick after
/// that is a no-op instead of a write to unmapped memory or a signal to a dead thread.
struct Target {
    /// `&kvm_run.immediate_exit` inside the vCPU's mmap'd run area.
    immediate_exit: *mut u8,
    /// The thread currently running the vCPU, if it has run.
    thread: Option<libc::pthread_t>,
}

/// The KVM implementation of [`VcpuKick`].
pub struct KvmKick {
    target: Mutex<Target>,
}

// SAFETY: the raw pointer is only dereferenced under the mutex and only while the owning vCPU
// is alive (`KvmVcpu::drop` clears it under the same mutex before the run area is unmapped).
unsafe impl Send for KvmKick {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for KvmKick {}

impl KvmKick {
    pub fn new(immediate_exit: *mut u8) -> Self {
        KvmKick {
            target: Mutex::new(Target {
                immediate_exit,
                thread: None,
            }),
        }
    }

    /// Records the thread that runs the vCPU from now on.
    pub fn set_thread(&self, thread: libc::pthread_t) {
        self.lock().thread = Some(thread);
    }

    /// Forgets the vCPU; later kicks do nothing.
    pub fn detach(&self) {
        let mut t = self.lock();
        t.immediate_exit = std::ptr::null_mut();
        t.thread = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VcpuKick for KvmKick {
    fn kick(&self) {
        let t = self.lock();
        if t.immediate_exit.is_null() {
            return;
        }
        // SAFETY: non-null means the vCPU (and its kvm_run mapping) is alive, see `detach`.
        // A volatile byte store is what the kernel reads on the next KVM_RUN.
        unsafe { std::ptr::write_volatile(t.immediate_exit, 1) };
        if let Some(thread) = t.thread {
            // SAFETY: the thread is alive: it owns the vCPU, and the vCPU detaches this kick
            // target (under this mutex) before it is dropped, which happens before its thread
            // ends.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

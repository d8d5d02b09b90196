//! Running as PID 1: a minimal system, then the agent in a child process while PID 1 reaps.
//!
//! The agent does not serve from PID 1 itself: PID 1 inherits every orphaned process and must
//! reap it with `waitpid(-1)`, which would also steal the exit statuses of the commands the
//! agent waits for. So PID 1 forks the agent (before any thread exists), then only reaps, and
//! restarts the agent should it ever exit.

use std::process::ExitCode;
use std::time::Duration;

use crate::sys;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn is_mountpoint(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(p), Ok(parent)) = (
        std::fs::metadata(path),
        std::fs::metadata(format!("{path}/..")),
    ) else {
        return false;
    };
    p.dev() != parent.dev()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) {
    if is_mountpoint(target) {
        return;
    }
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = sys::mount(source, target, fstype, flags) {
        eprintln!("smolvm-agent: mounting {fstype} on {target} failed: {e}");
    }
}

/// Mounts `/proc`, `/sys`, `/dev` (devtmpfs) and a tmpfs on `/tmp` where not mounted yet, sets
/// `PATH`, then serves from a child process while this one reaps. Never returns in PID 1.
pub fn run_as_init(serve: impl Fn() -> ExitCode) -> ExitCode {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid);
    mount("sysfs", "/sys", "sysfs", nosuid);
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID);
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV);
    if std::env::var_os("PATH").is_none() {
        // Single-threaded here, so changing the environment is sound.
        std::env::set_var("PATH", PATH);
    }
    if std::env::var_os("HOME").is_none() {
        std::env::set_var("HOME", "/root");
    }
    let _ = std::env::set_current_dir("/");
    eprintln!("smolvm-agent: init: system mounted, starting the agent");
    loop {
        let agent = match sys::fork() {
            Ok(0) => return serve(),
            Ok(pid) => pid,
            Err(e) => {
                eprintln!("smolvm-agent: init: fork failed: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // Reap everything; leave the loop when the agent itself is gone.
        loop {
            match sys::wait_any() {
                Ok((pid, status)) if pid == agent => {
                    eprintln!("smolvm-agent: init: agent exited (wait status {status:#x}); restarting in 1 s");
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

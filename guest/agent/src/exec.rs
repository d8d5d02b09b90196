//! Exec: receive stdin, spawn in a new process group, stream output as it comes, enforce the
//! timeout on the whole group, report how it ended.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::conn::{output_kind, Conn, DataEnd};
use crate::protocol::{ErrorCode, ExecRequest, ExitStatus, Response, MAX_CHUNK};
use crate::sys;

/// After a timeout kill, how long output already in the pipes may still drain. Processes that
/// left the group (`setsid`) can hold the pipes open forever, so this is bounded.
const DRAIN_AFTER_KILL: Duration = Duration::from_millis(200);

/// Runs one exec request. `Err` only when the connection is unusable.
pub fn run(c: &mut Conn, req: ExecRequest) -> io::Result<()> {
    let mut stdin = Vec::with_capacity(req.stdin_len.min(MAX_CHUNK as u64) as usize);
    if let DataEnd::Aborted = c.recv_data(req.stdin_len, |b| stdin.extend_from_slice(b))? {
        return Ok(());
    }
    let program = OsStr::from_bytes(&req.argv[0]);
    let mut cmd = Command::new(program);
    cmd.args(req.argv[1..].iter().map(|a| OsStr::from_bytes(a)));
    if req.clear_env {
        cmd.env_clear();
    }
    for (k, v) in &req.env {
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    if let Some(dir) = &req.cwd {
        cmd.current_dir(OsStr::from_bytes(dir));
    }
    cmd.stdin(if stdin.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Its own process group, so a timeout can kill everything it started.
    .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let what = String::from_utf8_lossy(&req.argv[0]).into_owned();
            let cwd = req
                .cwd
                .as_ref()
                .map(|d| format!(" in {}", String::from_utf8_lossy(d)))
                .unwrap_or_default();
            return c.send_error(
                ErrorCode::SPAWN_FAILED,
                e.raw_os_error().unwrap_or(0),
                format!("cannot run {what:?}{cwd}: {e}"),
            );
        }
    };
    let deadline =
        (req.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(req.timeout_ms));
    let pumped = Pump {
        stdin: child.stdin.take(),
        stdin_data: stdin,
        stdin_off: 0,
        out: child.stdout.take(),
        err: child.stderr.take(),
    }
    .run(c, child.id(), deadline);
    let timed_out = match pumped {
        Ok(t) => t,
        Err(e) => {
            // The host went away: leave nothing running behind it.
            sys::kill_group(child.id());
            let _ = child.wait();
            return Err(e);
        }
    };
    let status = match finish(&mut child, deadline, timed_out) {
        Ok(s) => s,
        Err(e) => {
            return c.send_error(
                ErrorCode::INTERNAL,
                e.raw_os_error().unwrap_or(0),
                format!("waiting for the command failed: {e}"),
            )
        }
    };
    c.queue(&Response::Exit(status));
    c.flush()
}

/// Waits for the child (the pipes are closed or abandoned), enforcing what is left of the
/// deadline.
fn finish(child: &mut Child, deadline: Option<Instant>, timed_out: bool) -> io::Result<ExitStatus> {
    if !timed_out {
        let Some(deadline) = deadline else {
            return child.wait().map(convert);
        };
        // The pipes are closed, so it has almost always exited already.
        if let Some(s) = child.try_wait()? {
            return Ok(convert(s));
        }
        // It closed its output but runs on: wait until it exits or time is up.
        if sys::wait_exit_until(child.id(), deadline) {
            return child.wait().map(convert);
        }
    }
    sys::kill_group(child.id());
    child.wait()?;
    Ok(ExitStatus::TimedOut)
}

fn convert(s: std::process::ExitStatus) -> ExitStatus {
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitStatus::Exited(c),
        (None, Some(sig)) => ExitStatus::Signaled(sig),
        (None, None) => ExitStatus::Exited(-1),
    }
}

struct Pump {
    stdin: Option<ChildStdin>,
    stdin_data: Vec<u8>,
    stdin_off: usize,
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
}

impl Pump {
    /// Feeds stdin and forwards stdout/stderr until both reach end of file, or the deadline
    /// passes (then kills the group, drains briefly and returns `true`).
    fn run(mut self, c: &mut Conn, pgid: u32, deadline: Option<Instant>) -> io::Result<bool> {
        if let Some(s) = &self.stdin {
            // Never block on a child that does not read its input.
            sys::set_nonblocking(s.as_raw_fd())?;
        }
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut deadline = deadline;
        let mut killed = false;
        while self.out.is_some() || self.err.is_some() {
            let mut fds = Vec::with_capacity(3);
            let mut who = Vec::with_capacity(3);
            if let Some(o) = &self.out {
                fds.push(pollfd(o.as_raw_fd(), libc::POLLIN));
                who.push(0);
            }
            if let Some(e) = &self.err {
                fds.push(pollfd(e.as_raw_fd(), libc::POLLIN));
                who.push(1);
            }
            if let Some(i) = &self.stdin {
                fds.push(pollfd(i.as_raw_fd(), libc::POLLOUT));
                who.push(2);
            }
            let timeout = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    left.as_millis().min(i32::MAX as u128) as i32 + i32::from(!left.is_zero())
                }
            };
            let ready = sys::poll(&mut fds, timeout)?;
            if ready == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                if killed {
                    break; // Drained what we could.
                }
                sys::kill_group(pgid);
                killed = true;
                self.stdin = None;
                deadline = Some(Instant::now() + DRAIN_AFTER_KILL);
                continue;
            }
            for (fd, w) in fds.iter().zip(&who) {
                if fd.revents == 0 {
                    continue;
                }
                match w {
                    0 | 1 => {
                        let r = if *w == 0 {
                            self.out.as_mut().map(|p| p.read(&mut buf))
                        } else {
                            self.err.as_mut().map(|p| p.read(&mut buf))
                        };
                        match r {
                            Some(Ok(0)) | Some(Err(_)) => {
                                if *w == 0 {
                                    self.out = None;
                                } else {
                                    self.err = None;
                                }
                            }
                            Some(Ok(n)) => {
                                c.queue_data(output_kind(*w == 1), &buf[..n]);
                                c.flush()?;
                            }
                            None => {}
                        }
                    }
                    _ => self.feed_stdin(),
                }
            }
        }
        Ok(killed)
    }

    fn feed_stdin(&mut self) {
        let Some(s) = &mut self.stdin else { return };
        match s.write(&self.stdin_data[self.stdin_off..]) {
            Ok(n) => self.stdin_off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EPIPE: the command does not read its input; that is its business.
            Err(_) => self.stdin_off = self.stdin_data.len(),
        }
        if self.stdin_off >= self.stdin_data.len() {
            self.stdin = None; // Close: the command sees end of file.
            self.stdin_data = Vec::new();
        }
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

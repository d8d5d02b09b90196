//! smolvm-agent: the guest side of smolvm's agent protocol (see `PROTOCOL.md`).
//!
//! Listens on vsock port 52 (any CID) or, with `--unix PATH`, on a Unix socket (for running on
//! a host, as the tests do). One thread per connection; one request at a time per connection.
//! As PID 1 it also sets up a minimal system (mounts, `PATH`) and reaps orphans; see
//! `README.md`.

// The very same protocol code as the host client, not a copy.
#[path = "../../../src/agent/protocol.rs"]
#[allow(dead_code)]
mod protocol;

mod conn;
mod exec;
mod files;
mod init;
mod sys;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Most connections served at once, 64. Each costs a thread, a frame buffer of up to
/// `MAX_FRAME_LEN` and, while a command runs, its stdin buffer; in a small guest that must stay
/// bounded. 64 is far more than a host needs for concurrent commands; a client past the limit
/// gets a `BUSY` error and should retry.
const MAX_CONNECTIONS: usize = 64;

/// Stack for connection threads: they keep their buffers on the heap.
const THREAD_STACK: usize = 256 << 10;

const USAGE: &str = "usage: smolvm-agent [--port N | --unix PATH]
  --port N     listen on vsock port N, any CID (default 52)
  --unix PATH  listen on a Unix socket at PATH instead of vsock (for tests on a host)
  --version    print the version";

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// vsock, any CID.
    Vsock(u32),
    /// A Unix socket path.
    Unix(String),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock(p) => write!(f, "vsock port {p}"),
            Self::Unix(p) => write!(f, "unix socket {p}"),
        }
    }
}

fn parse_args() -> Result<Listen, String> {
    let mut listen = Listen::Vsock(protocol::AGENT_PORT);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                listen = Listen::Vsock(v.parse().map_err(|_| format!("bad port {v:?}"))?);
            }
            "--unix" => listen = Listen::Unix(args.next().ok_or("--unix needs a path")?),
            "--version" => {
                println!("smolvm-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown command-line words to init; ignore them as PID 1.
            _ if sys::getpid() == 1 => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(listen)
}

enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

fn bind(listen: &Listen) -> std::io::Result<Listener> {
    Ok(match listen {
        Listen::Vsock(port) => Listener::Vsock(sys::vsock_listen(*port)?),
        Listen::Unix(path) => {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            Listener::Unix(UnixListener::bind(path)?)
        }
    })
}

/// Accepts connections forever, one thread each, up to [`MAX_CONNECTIONS`].
fn serve(listen: &Listen) -> ExitCode {
    let listener = match bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("smolvm-agent: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fd = match &listener {
        Listener::Vsock(fd) => fd.as_raw_fd(),
        Listener::Unix(l) => l.as_raw_fd(),
    };
    eprintln!(
        "smolvm-agent: ready on {listen} (pid {}, protocol {})",
        sys::getpid(),
        protocol::PROTOCOL_VERSION
    );
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match sys::accept(fd) {
            Ok(s) => s,
            Err(e) => {
                // EMFILE, ENOMEM...: back off rather than spin.
                eprintln!("smolvm-agent: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            conn::refuse_busy(stream, MAX_CONNECTIONS);
            continue;
        }
        let active2 = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                conn::serve(stream);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            eprintln!("smolvm-agent: cannot start a connection thread: {e}");
        }
    }
}

fn main() -> ExitCode {
    let listen = match parse_args() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("smolvm-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if sys::getpid() == 1 {
        init::run_as_init(|| serve(&listen))
    } else {
        serve(&listen)
    }
}

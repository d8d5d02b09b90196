//! Builds the guest agent (`guest/agent/`) once per test run and runs it as a host process on
//! a Unix socket: the same binary and protocol code as in a guest, only the transport differs.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use smolvm::agent::{wait_ready, AgentClient};

/// Builds the agent with `profile` ("debug" or "release") into `target/agent/` (its own target
/// directory: the agent is not part of this workspace) and returns the binary's path.
pub fn agent_binary(release: bool) -> PathBuf {
    static DEBUG: OnceLock<PathBuf> = OnceLock::new();
    static RELEASE: OnceLock<PathBuf> = OnceLock::new();
    let cell = if release { &RELEASE } else { &DEBUG };
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("agent");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(root.join("guest/agent/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cannot run cargo to build guest/agent");
        assert!(status.success(), "building guest/agent failed");
        target
            .join(if release { "release" } else { "debug" })
            .join("smolvm-agent")
    })
    .clone()
}

/// A running agent process listening on a Unix socket in a private temporary directory.
pub struct HostAgent {
    child: Child,
    /// The private directory (also a scratch space for tests).
    pub dir: PathBuf,
    /// The socket path.
    pub sock: PathBuf,
}

impl HostAgent {
    /// Starts the (debug) agent and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts the agent built in debug or release mode and waits until it answers.
    pub fn start_with(release: bool) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = agent_binary(release);
        let dir = std::env::temp_dir().join(format!(
            "smolvm-agent-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(bin)
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the agent");
        let agent = Self { child, dir, sock };
        drop(agent.connect());
        agent
    }

    /// A new client connection (waits up to 20 s for the agent to come up).
    pub fn connect(&self) -> AgentClient<UnixStream> {
        wait_ready(|| UnixStream::connect(&self.sock), Duration::from_secs(20))
            .expect("agent did not come up")
    }

    /// A raw socket connection, for speaking the protocol by hand.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Whether the agent process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

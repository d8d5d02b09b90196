//! Talking to the guest agent: run commands and move files inside a running VM.
//!
//! The agent (`guest/agent/` in this repository) is a small static Linux binary that runs in
//! the guest (as init or started by it) and listens on vsock port [`AGENT_PORT`]. The host
//! side is [`AgentClient`], which works over any `Read + Write` byte stream: a vsock
//! connection from the VM, or a Unix socket to an agent run as a host process (how the tests
//! drive it). The wire format lives in [`protocol`], shared verbatim with the agent binary, and
//! is specified in `guest/agent/PROTOCOL.md`.
//!
//! One connection carries one request at a time; run commands concurrently over several
//! connections. The agent serves up to 64 at once.
//!
//! # Example
//! ```no_run
//! use smolvm::agent::{AgentClient, Command};
//! use std::os::unix::net::UnixStream;
//! use std::time::Duration;
//!
//! let mut agent = AgentClient::new(UnixStream::connect("/tmp/agent.sock")?)?;
//! let out = agent.exec(&Command::new("uname").arg("-a").timeout(Duration::from_secs(5)))?;
//! assert!(out.status.success());
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! agent.write_file("/tmp/hello.txt", b"hi\n", 0o644)?;
//! assert_eq!(agent.read_file("/tmp/hello.txt")?, b"hi\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
pub mod protocol;

pub use client::{wait_ready, AgentClient, AgentError, Command, ExecEvent, ExecOutput};
pub use protocol::{AgentInfo, ErrorCode, ExitStatus, AGENT_PORT, PROTOCOL_VERSION};

//! Talking to a running guest through its vsock device: raw streams
//! ([`VmHandle::vsock_connect`], [`VmHandle::vsock_listen`]) and the guest agent
//! ([`VmHandle::exec`], [`VmHandle::copy_in`], ...), which listens on vsock port
//! [`AGENT_PORT`] inside the guest (`guest/agent/`).
//!
//! Every agent call opens its own vsock connection (an in-process socket pair: no socket file,
//! about as cheap as a Unix-socket connect), so calls from several threads run concurrently.
//! [`VmHandle::agent`] hands out a connected client for callers that want to reuse one.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::handle::VmHandle;
use crate::agent::{
    AgentClient, AgentError, AgentInfo, Command, ExecEvent, ExecOutput, ExitStatus, AGENT_PORT,
};
use crate::devices::virtio::vsock::{VsockHost, VsockListener};
use crate::{Error, Result};

/// How long an agent call waits for the guest to accept its vsock connection.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl VmHandle {
    /// The in-process side of the VM's vsock device: connect to guest ports, accept guest
    /// connections. Clone it freely; it stays valid while the VM runs.
    ///
    /// # Errors
    /// [`Error::Config`] when the VM has no vsock device
    /// ([`VmBuilder::vsock`](super::VmBuilder::vsock)), [`Error::InvalidState`] after it
    /// exited.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::virtio::vsock::VsockConfig;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").vsock(VsockConfig::new(3)).start()?;
    /// let host = vm.vsock()?;
    /// # drop(host);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn vsock(&self) -> Result<VsockHost> {
        self.with_resources("use the vsock device", |r| {
            r.vsock.as_ref().map(|v| v.host.clone())
        })?
        .ok_or_else(|| {
            Error::Config("the VM has no vsock device: add one with VmBuilder::vsock".into())
        })
    }

    /// Connects to `port` in the guest; returns once the guest accepted.
    ///
    /// # Errors
    /// As [`vsock`](Self::vsock); [`Error::VsockIo`] with `ConnectionRefused` when nothing
    /// listens on the port, `TimedOut` when the guest did not answer within `timeout`.
    ///
    /// # Example
    /// ```no_run
    /// use std::io::Write;
    /// use std::time::Duration;
    /// use smolvm::devices::virtio::vsock::VsockConfig;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").vsock(VsockConfig::new(3)).start()?;
    /// let mut s = vm.vsock_connect(1234, Duration::from_secs(1))?;
    /// s.write_all(b"hello")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn vsock_connect(&self, port: u32, timeout: Duration) -> Result<UnixStream> {
        self.vsock()?
            .connect(port, timeout)
            .map_err(|source| Error::VsockIo {
                op: format!("connect to guest port {port}"),
                source,
            })
    }

    /// Accepts guest connections to host (CID 2) port `port`.
    ///
    /// # Errors
    /// As [`vsock`](Self::vsock); [`Error::VsockIo`] when something already listens on
    /// `port`.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::virtio::vsock::VsockConfig;
    /// let vm = smolvm::VmBuilder::new().kernel("vmlinux").vsock(VsockConfig::new(3)).start()?;
    /// let listener = vm.vsock_listen(9000)?;
    /// let (stream, guest_port) = listener.accept()?;
    /// # drop((stream, guest_port));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn vsock_listen(&self, port: u32) -> Result<VsockListener> {
        self.vsock()?.listen(port).map_err(|source| Error::VsockIo {
            op: format!("listen on host port {port}"),
            source,
        })
    }

    /// A client connected to the guest agent (handshake done), for several calls over one
    /// connection.
    ///
    /// # Errors
    /// As [`vsock_connect`](Self::vsock_connect) (to [`AGENT_PORT`]), or [`Error::Agent`] when
    /// the handshake fails.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::agent::Command;
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// let mut agent = vm.agent()?;
    /// for _ in 0..3 {
    ///     agent.exec(&Command::new("true"))?;
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn agent(&self) -> Result<AgentClient<UnixStream>> {
        let stream = self.vsock_connect(AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
        Ok(AgentClient::new(stream)?)
    }

    /// Waits until the guest agent answers (connect, handshake, ping), retrying while the
    /// guest boots; returns what the agent says about itself.
    ///
    /// # Errors
    /// [`Error::Agent`] with [`AgentError::NotReady`] after `timeout` (it carries the last
    /// failure), or the VM stopped while waiting; [`Error::Config`] without a vsock device.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// let info = vm.wait_agent_ready(Duration::from_secs(10))?;
    /// println!("agent {} on {}", info.agent_version, info.hostname);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn wait_agent_ready(&self, timeout: Duration) -> Result<AgentInfo> {
        let host = self.vsock()?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.exit_reason().is_some() {
                return Err(Error::InvalidState {
                    op: "wait for the guest agent",
                    state: "exited",
                });
            }
            let left = timeout.saturating_sub(start.elapsed());
            let attempt = host
                .connect(AGENT_PORT, left.max(Duration::from_millis(1)))
                .and_then(|s| {
                    // A hung agent must not stall the wait past its deadline.
                    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                    Ok(s)
                })
                .map_err(AgentError::Io)
                .and_then(AgentClient::new)
                .and_then(|mut c| c.ping());
            let last = match attempt {
                Ok(info) => return Ok(info),
                Err(e @ AgentError::VersionMismatch { .. }) => return Err(e.into()),
                Err(e) => e,
            };
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(AgentError::NotReady {
                    waited,
                    last: Box::new(last),
                }
                .into());
            }
            // Refusals come back within microseconds while the guest boots: back off from
            // 1 ms to 20 ms so readiness is seen quickly without spinning.
            std::thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The guest's vsock context id (CID), `None` without a vsock device.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited.
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// assert_eq!(vm.vsock_cid()?, Some(3));
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn vsock_cid(&self) -> Result<Option<u64>> {
        self.with_resources("read the vsock CID", |r| {
            r.vsock.as_ref().map(|v| v.guest_cid)
        })
    }

    /// Where the guest finds the vsock device (virtio-mmio window and interrupt), `None`
    /// without one.
    ///
    /// # Errors
    /// [`Error::InvalidState`] after the VM exited.
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// println!("{:?}", vm.vsock_slot()?);
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn vsock_slot(&self) -> Result<Option<crate::devices::virtio::MmioSlot>> {
        self.with_resources("read the vsock slot", |r| r.vsock.as_ref().map(|v| v.slot))
    }

    /// Runs a command in the guest through the agent and returns its exit status and
    /// output.
    ///
    /// # Errors
    /// [`Error::Agent`]: [`AgentError::Remote`] when the command cannot start (not found,
    /// bad working directory), transport and protocol errors; as [`agent`](Self::agent).
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use smolvm::agent::Command;
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// let out = vm.exec(&Command::new("uname").arg("-a").timeout(Duration::from_secs(5)))?;
    /// assert!(out.status.success());
    /// print!("{}", String::from_utf8_lossy(&out.stdout));
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn exec(&self, cmd: &Command) -> Result<ExecOutput> {
        Ok(self.agent()?.exec(cmd)?)
    }

    /// Runs a command in the guest, handing stdout and stderr to `on_output` as the guest
    /// produces them; returns the exit status.
    ///
    /// # Errors
    /// As [`exec`](Self::exec).
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::agent::{Command, ExecEvent};
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// let status = vm.exec_streaming(&Command::new("dmesg"), |e| match e {
    ///     ExecEvent::Stdout(b) => print!("{}", String::from_utf8_lossy(b)),
    ///     ExecEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(b)),
    /// })?;
    /// println!("{status:?}");
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn exec_streaming(
        &self,
        cmd: &Command,
        on_output: impl FnMut(ExecEvent<'_>),
    ) -> Result<ExitStatus> {
        Ok(self.agent()?.exec_streaming(cmd, on_output)?)
    }

    /// Copies the host file `local` to `remote` in the guest (written atomically, with
    /// permission bits `mode`); returns the bytes copied.
    ///
    /// # Errors
    /// [`Error::Agent`]: the local file cannot be read, is larger than the protocol's file
    /// limit, or the guest cannot write `remote`.
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// vm.copy_in(std::path::Path::new("script.sh"), "/tmp/script.sh", 0o755)?;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn copy_in(&self, local: &Path, remote: &str, mode: u32) -> Result<u64> {
        Ok(self.agent()?.copy_in(local, remote, mode)?)
    }

    /// Copies the guest file `remote` to `local` on the host; returns the bytes copied.
    ///
    /// # Errors
    /// [`Error::Agent`]: the guest file does not exist or is too large, or `local` cannot be
    /// written.
    ///
    /// # Example
    /// ```no_run
    /// # let vm: smolvm::VmHandle = unimplemented!();
    /// vm.copy_out("/var/log/messages", std::path::Path::new("guest.log"))?;
    /// # Ok::<(), smolvm::Error>(())
    /// ```
    pub fn copy_out(&self, remote: &str, local: &Path) -> Result<u64> {
        Ok(self.agent()?.copy_out(remote, local)?)
    }
}

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Self {
        Error::Agent(Box::new(e))
    }
}

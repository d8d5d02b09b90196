//! The host side of the agent protocol: [`AgentClient`] and the [`Command`] builder.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::protocol::{
    self, decode_response, encode_data, kind, read_frame, DecodeError, ErrorCode, ExecRequest,
    ExitStatus, ReadFrameError, Request, Response, MAX_CHUNK, MAX_FRAME_LEN, MAX_STDIN,
    PROTOCOL_VERSION,
};
use super::AgentInfo;

/// Most bytes [`AgentClient::exec`] collects per stream (stdout, stderr) by default, 64 MiB:
/// the guest is not trusted, and a command printing without end must not exhaust the host.
/// Change it with [`AgentClient::set_output_limit`]; [`AgentClient::exec_streaming`] has no
/// limit.
const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;

/// Bytes of outgoing frames gathered before one `write` to the stream.
const WRITE_BATCH: usize = 256 << 10;

/// Why an agent call failed. Each message says what to do about it.
///
/// After [`Io`](Self::Io), [`Closed`](Self::Closed), [`Protocol`](Self::Protocol) or
/// [`UnexpectedResponse`](Self::UnexpectedResponse) the connection is out of step and every
/// later call returns [`Broken`](Self::Broken): open a new connection. After the others the
/// connection is still usable.
///
/// # Example
/// ```no_run
/// use smolvm::agent::{AgentClient, AgentError, Command};
/// # let stream = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
/// let mut agent = AgentClient::new(stream)?;
/// match agent.exec(&Command::new("no-such-program")) {
///     Err(AgentError::Remote { errno, .. }) if errno == libc::ENOENT => println!("not installed"),
///     Err(e) => return Err(e.into()),
///     Ok(out) => println!("{}", out.status),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Reading from or writing to the connection failed (including a read timeout set on the
    /// stream).
    #[error("agent connection I/O failed: {0}; open a new connection (is the agent running?)")]
    Io(#[from] io::Error),
    /// Reading or writing a file on the host failed (the connection is still usable).
    #[error("local file I/O failed: {0}")]
    Local(#[source] io::Error),
    /// The agent closed the connection.
    #[error(
        "the agent closed the connection; open a new one (the agent may have restarted or be \
         at its connection limit)"
    )]
    Closed,
    /// The agent sent bytes that are not a valid message.
    #[error("agent sent an invalid message: {0}; open a new connection and check agent versions")]
    Protocol(DecodeError),
    /// The agent sent a valid message that does not fit the request.
    #[error("agent sent {got} where {expected} was expected; open a new connection")]
    UnexpectedResponse {
        /// What the client waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The agent reported an error for the request (e.g. the program does not exist:
    /// `SPAWN_FAILED` with `errno` `ENOENT`).
    #[error("agent reported {code}: {message}")]
    Remote {
        /// What kind of error.
        code: ErrorCode,
        /// The guest `errno`, or 0.
        errno: i32,
        /// The agent's explanation.
        message: String,
    },
    /// The agent speaks no version this client knows.
    #[error(
        "the agent shares no protocol version with this client (client speaks {min}..={max}): \
         {message}; rebuild the guest image with the agent from this smolvm version"
    )]
    VersionMismatch {
        /// Lowest version the client speaks.
        min: u16,
        /// Highest version the client speaks.
        max: u16,
        /// The agent's explanation.
        message: String,
    },
    /// Something is over a protocol or client limit.
    #[error(
        "{what} is {len} bytes, over the limit of {max}; split the data (files) or redirect \
         to a file in the guest (output)"
    )]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A command or path breaks a protocol rule (empty argv, NUL byte, relative path...).
    #[error("invalid request: {0}")]
    Invalid(DecodeError),
    /// An earlier error left this connection out of step.
    #[error("an earlier error left this agent connection unusable; open a new connection")]
    Broken,
    /// [`wait_ready`] gave up.
    #[error(
        "agent not ready after {waited:?} (last error: {last}); check the guest console for \
         the agent's ready line and that it listens on the expected port"
    )]
    NotReady {
        /// How long it tried.
        waited: Duration,
        /// The last attempt's error.
        last: Box<AgentError>,
    },
}

impl AgentError {
    /// Whether the connection is unusable after this error.
    fn breaks_connection(&self) -> bool {
        matches!(
            self,
            Self::Io(_) | Self::Closed | Self::Protocol(_) | Self::UnexpectedResponse { .. }
        )
    }
}

fn remote_err(e: protocol::RemoteError) -> AgentError {
    AgentError::Remote {
        code: e.code,
        errno: e.errno,
        message: e.message,
    }
}

fn name(r: &Response) -> &'static str {
    match r {
        Response::HelloOk { .. } => "HelloOk",
        Response::Pong(_) => "Pong",
        Response::Stdout(_) => "Stdout",
        Response::Stderr(_) => "Stderr",
        Response::Exit(_) => "Exit",
        Response::FileWritten { .. } => "FileWritten",
        Response::FileStart { .. } => "FileStart",
        Response::Data(_) => "Data",
        Response::FileEnd => "FileEnd",
        Response::Error(_) => "Error",
    }
}

fn unexpected(expected: &'static str, got: &Response) -> AgentError {
    AgentError::UnexpectedResponse {
        expected,
        got: name(got),
    }
}

/// A command to run in the guest, built like [`std::process::Command`].
///
/// # Example
/// ```
/// use smolvm::agent::Command;
/// use std::time::Duration;
/// let cmd = Command::new("grep")
///     .arg("-c")
///     .arg("x")
///     .env("LC_ALL", "C")
///     .cwd("/tmp")
///     .stdin(b"x\ny\nx\n".to_vec())
///     .timeout(Duration::from_secs(10));
/// assert_eq!(cmd.get_args().len(), 3);
/// ```
#[derive(Debug, Clone)]
pub struct Command {
    req: ExecRequest,
    stdin: Vec<u8>,
}

fn bytes(s: impl AsRef<OsStr>) -> Vec<u8> {
    s.as_ref().as_bytes().to_vec()
}

impl Command {
    /// A command running `program` (looked up in the guest's `PATH` when it has no `/`), with
    /// no arguments, the agent's environment, no stdin and no timeout.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("true");
    /// assert_eq!(cmd.get_args(), [b"true".to_vec()]);
    /// ```
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            req: ExecRequest {
                argv: vec![bytes(program)],
                ..Default::default()
            },
            stdin: Vec::new(),
        }
    }

    /// Adds an argument.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("ls").arg("-l");
    /// assert_eq!(cmd.get_args()[1], b"-l");
    /// ```
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.req.argv.push(bytes(arg));
        self
    }

    /// Adds arguments.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("sh").args(["-c", "exit 3"]);
    /// assert_eq!(cmd.get_args().len(), 3);
    /// ```
    pub fn args<I: IntoIterator<Item = A>, A: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.req.argv.extend(args.into_iter().map(bytes));
        self
    }

    /// Sets an environment variable for the command.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("env").env("K", "V");
    /// # let _ = cmd;
    /// ```
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.req.env.push((bytes(key), bytes(value)));
        self
    }

    /// Starts from an empty environment instead of the agent's (variables set with
    /// [`env`](Self::env) still apply).
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("/usr/bin/env").env_clear().env("PATH", "/bin");
    /// # let _ = cmd;
    /// ```
    pub fn env_clear(mut self) -> Self {
        self.req.clear_env = true;
        self
    }

    /// Sets the working directory.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("pwd").cwd("/tmp");
    /// # let _ = cmd;
    /// ```
    pub fn cwd(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.req.cwd = Some(bytes(dir));
        self
    }

    /// Bytes fed to the command's stdin (at most [`protocol::MAX_STDIN`]); stdin is closed
    /// after them. Without this, stdin is empty.
    ///
    /// # Example
    /// ```
    /// let cmd = smolvm::agent::Command::new("cat").stdin(&b"hello"[..]);
    /// # let _ = cmd;
    /// ```
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    /// Kills the command's whole process group with `SIGKILL` after `timeout` (rounded up to a
    /// millisecond); the result is then [`ExitStatus::TimedOut`].
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// let cmd = smolvm::agent::Command::new("sleep").arg("9").timeout(Duration::from_millis(100));
    /// # let _ = cmd;
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
        self.req.timeout_ms = u64::try_from(ms).unwrap_or(u64::MAX);
        self
    }

    /// The program and arguments.
    ///
    /// # Example
    /// ```
    /// assert_eq!(smolvm::agent::Command::new("id").get_args(), [b"id".to_vec()]);
    /// ```
    pub fn get_args(&self) -> &[Vec<u8>] {
        &self.req.argv
    }
}

/// A piece of output from [`AgentClient::exec_streaming`], as the command produced it.
///
/// # Example
/// ```
/// use smolvm::agent::ExecEvent;
/// let ev = ExecEvent::Stdout(b"hi");
/// if let ExecEvent::Stdout(b) = ev { assert_eq!(b, b"hi"); }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEvent<'a> {
    /// Bytes the command wrote to stdout.
    Stdout(&'a [u8]),
    /// Bytes the command wrote to stderr.
    Stderr(&'a [u8]),
}

/// The result of [`AgentClient::exec`].
///
/// # Example
/// ```
/// use smolvm::agent::{ExecOutput, ExitStatus};
/// let out = ExecOutput { status: ExitStatus::Exited(0), stdout: b"ok\n".to_vec(), stderr: vec![] };
/// assert!(out.status.success());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How the command ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// A connection to the guest agent over any byte stream (vsock, Unix socket).
///
/// One request runs at a time; use one client per thread for concurrency. Calls block until
/// the agent answers: set a read timeout on the stream (e.g.
/// [`UnixStream::set_read_timeout`](std::os::unix::net::UnixStream::set_read_timeout)) to
/// bound that, keeping it longer than your command timeouts.
///
/// # Example
/// ```no_run
/// use smolvm::agent::{AgentClient, Command, ExecEvent};
/// let stream = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
/// let mut agent = AgentClient::new(stream)?;
/// let status = agent.exec_streaming(&Command::new("make"), |ev| match ev {
///     ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => print!("{}", String::from_utf8_lossy(b)),
/// })?;
/// println!("make: {status}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct AgentClient<S> {
    stream: S,
    version: u16,
    agent_version: String,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    output_limit: usize,
    broken: bool,
}

impl<S: Read + Write> AgentClient<S> {
    /// Performs the version handshake on `stream`.
    ///
    /// # Example
    /// ```no_run
    /// let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let agent = smolvm::agent::AgentClient::new(s)?;
    /// println!("agent {} speaks v{}", agent.agent_version(), agent.protocol_version());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(stream: S) -> Result<Self, AgentError> {
        let mut c = Self {
            stream,
            version: 0,
            agent_version: String::new(),
            wbuf: Vec::with_capacity(4096),
            rbuf: Vec::with_capacity(4096),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            broken: false,
        };
        c.guard(|c| {
            Request::Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
            }
            .encode(&mut c.wbuf);
            c.flush()?;
            match c.recv()? {
                Response::HelloOk {
                    version,
                    agent_version,
                } if version == PROTOCOL_VERSION => {
                    c.version = version;
                    c.agent_version = agent_version;
                    Ok(())
                }
                Response::HelloOk { version, .. } => Err(AgentError::VersionMismatch {
                    min: PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                    message: format!("the agent chose version {version}"),
                }),
                Response::Error(e) if e.code == ErrorCode::VERSION_MISMATCH => {
                    Err(AgentError::VersionMismatch {
                        min: PROTOCOL_VERSION,
                        max: PROTOCOL_VERSION,
                        message: e.message,
                    })
                }
                Response::Error(e) => Err(remote_err(e)),
                other => Err(unexpected("HelloOk", &other)),
            }
        })?;
        Ok(c)
    }

    /// The negotiated protocol version.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let agent = smolvm::agent::AgentClient::new(s)?;
    /// assert_eq!(agent.protocol_version(), smolvm::agent::PROTOCOL_VERSION);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// The agent's own version, from the handshake.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let agent = smolvm::agent::AgentClient::new(s)?;
    /// println!("{}", agent.agent_version());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Sets how many bytes [`exec`](Self::exec) collects per stream before it fails with
    /// [`AgentError::TooLarge`] (default 64 MiB).
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// agent.set_output_limit(1 << 20);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_output_limit(&mut self, bytes: usize) {
        self.output_limit = bytes;
    }

    /// The underlying stream (e.g. to change its timeouts).
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let agent = smolvm::agent::AgentClient::new(s)?;
    /// agent.get_ref().set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Gives the stream back.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let agent = smolvm::agent::AgentClient::new(s)?;
    /// let stream = agent.into_inner();
    /// # drop(stream);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Asks the agent who it is and for how long the guest has been up.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// let info = agent.ping()?;
    /// println!("{} up {} ms", info.hostname, info.uptime_ms);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ping(&mut self) -> Result<AgentInfo, AgentError> {
        self.guard(|c| {
            Request::Ping.encode(&mut c.wbuf);
            c.flush()?;
            match c.recv()? {
                Response::Pong(info) => Ok(info),
                Response::Error(e) => Err(remote_err(e)),
                other => Err(unexpected("Pong", &other)),
            }
        })
    }

    /// Runs a command and collects its output (up to the output limit per stream).
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::agent::{AgentClient, Command, ExitStatus};
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = AgentClient::new(s)?;
    /// let out = agent.exec(&Command::new("sh").args(["-c", "echo hi; exit 3"]))?;
    /// assert_eq!(out.status, ExitStatus::Exited(3));
    /// assert_eq!(out.stdout, b"hi\n");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn exec(&mut self, cmd: &Command) -> Result<ExecOutput, AgentError> {
        let limit = self.output_limit;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut over = None;
        let status = self.exec_streaming(cmd, |ev| {
            let (buf, what) = match ev {
                ExecEvent::Stdout(b) => (&mut stdout, ("stdout", b)),
                ExecEvent::Stderr(b) => (&mut stderr, ("stderr", b)),
            };
            let (what, b) = what;
            if buf.len() + b.len() > limit {
                over.get_or_insert((what, buf.len() + b.len()));
            } else {
                buf.extend_from_slice(b);
            }
        })?;
        if let Some((what, len)) = over {
            return Err(AgentError::TooLarge {
                what,
                len: len as u64,
                max: limit as u64,
            });
        }
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs a command, handing each chunk of stdout and stderr to `on_output` as the agent
    /// forwards it, and returns how the command ended.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::agent::{AgentClient, Command, ExecEvent};
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = AgentClient::new(s)?;
    /// let mut lines = 0;
    /// agent.exec_streaming(&Command::new("seq").arg("100"), |ev| {
    ///     if let ExecEvent::Stdout(b) = ev {
    ///         lines += b.iter().filter(|&&c| c == b'\n').count();
    ///     }
    /// })?;
    /// assert_eq!(lines, 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn exec_streaming(
        &mut self,
        cmd: &Command,
        mut on_output: impl FnMut(ExecEvent<'_>),
    ) -> Result<ExitStatus, AgentError> {
        if cmd.stdin.len() as u64 > MAX_STDIN {
            return Err(AgentError::TooLarge {
                what: "stdin",
                len: cmd.stdin.len() as u64,
                max: MAX_STDIN,
            });
        }
        let mut req = cmd.req.clone();
        req.stdin_len = cmd.stdin.len() as u64;
        req.validate().map_err(AgentError::Invalid)?;
        self.guard(|c| {
            Request::Exec(req).encode(&mut c.wbuf);
            if c.wbuf.len() - protocol::HEADER_LEN + 1 > MAX_FRAME_LEN {
                let len = c.wbuf.len() as u64;
                c.wbuf.clear();
                return Err(AgentError::TooLarge {
                    what: "command line and environment",
                    len,
                    max: MAX_FRAME_LEN as u64,
                });
            }
            c.send_data(&mut &cmd.stdin[..], cmd.stdin.len() as u64)?;
            loop {
                match c.recv()? {
                    Response::Stdout(b) => on_output(ExecEvent::Stdout(&b)),
                    Response::Stderr(b) => on_output(ExecEvent::Stderr(&b)),
                    Response::Exit(s) => return Ok(s),
                    Response::Error(e) => return Err(remote_err(e)),
                    other => return Err(unexpected("Stdout, Stderr or Exit", &other)),
                }
            }
        })
    }

    /// Writes `data` to the guest file `remote` (an absolute path) with permission bits
    /// `mode`, atomically: the agent writes a temporary file in the same directory, syncs it
    /// and renames it over `remote`. Returns the bytes written.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// agent.write_file("/tmp/run.sh", b"#!/bin/sh\necho hi\n", 0o755)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_file(&mut self, remote: &str, data: &[u8], mode: u32) -> Result<u64, AgentError> {
        self.send_file(remote, mode, data.len() as u64, &mut &data[..])
    }

    /// Copies the host file `local` to the guest file `remote` (absolute), atomically as
    /// [`write_file`](Self::write_file), streaming it in chunks. Returns the bytes copied.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// agent.copy_in("target/release/tool".as_ref(), "/usr/local/bin/tool", 0o755)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn copy_in(&mut self, local: &Path, remote: &str, mode: u32) -> Result<u64, AgentError> {
        let mut f = File::open(local).map_err(AgentError::Local)?;
        let len = f.metadata().map_err(AgentError::Local)?.len();
        self.send_file(remote, mode, len, &mut f)
    }

    /// Reads the guest file `remote` (absolute) into memory.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// let hosts = agent.read_file("/etc/hosts")?;
    /// # let _ = hosts;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_file(&mut self, remote: &str) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        self.recv_file(remote, |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Copies the guest file `remote` (absolute) to the host file `local` (created or
    /// truncated), streaming it in chunks. Returns the bytes copied.
    ///
    /// # Example
    /// ```no_run
    /// # let s = std::os::unix::net::UnixStream::connect("/tmp/agent.sock")?;
    /// let mut agent = smolvm::agent::AgentClient::new(s)?;
    /// agent.copy_out("/tmp/report.json", "report.json".as_ref())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn copy_out(&mut self, remote: &str, local: &Path) -> Result<u64, AgentError> {
        let mut f = File::create(local).map_err(AgentError::Local)?;
        let n = self.recv_file(remote, |b| f.write_all(b))?;
        f.flush().map_err(AgentError::Local)?;
        Ok(n)
    }

    // -----------------------------------------------------------------------------------------

    /// Runs `f` unless the connection is broken, and marks it broken when `f` fails in a way
    /// that leaves the stream out of step.
    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        if self.broken {
            return Err(AgentError::Broken);
        }
        let r = f(self);
        if let Err(e) = &r {
            if e.breaks_connection() {
                self.broken = true;
            }
        }
        self.wbuf.clear();
        r
    }

    fn flush(&mut self) -> Result<(), AgentError> {
        self.stream.write_all(&self.wbuf)?;
        self.stream.flush()?;
        self.wbuf.clear();
        Ok(())
    }

    fn recv(&mut self) -> Result<Response, AgentError> {
        match read_frame(&mut self.stream, &mut self.rbuf) {
            Ok(Some(t)) => decode_response(t, &self.rbuf).map_err(AgentError::Protocol),
            Ok(None) => Err(AgentError::Closed),
            Err(ReadFrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(AgentError::Closed)
            }
            Err(ReadFrameError::Io(e)) => Err(AgentError::Io(e)),
            Err(ReadFrameError::Decode(e)) => Err(AgentError::Protocol(e)),
        }
    }

    /// Sends exactly `len` bytes from `src` as data frames after what is in `wbuf`, then
    /// flushes.
    fn send_data(&mut self, src: &mut dyn Read, len: u64) -> Result<(), AgentError> {
        let mut left = len;
        let mut chunk = vec![0u8; MAX_CHUNK.min(len as usize)];
        while left > 0 {
            let want = (left as usize).min(MAX_CHUNK);
            let n = src.read(&mut chunk[..want]).map_err(|e| {
                io::Error::new(e.kind(), format!("reading the local data to send: {e}"))
            })?;
            if n == 0 {
                return Err(AgentError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the local file shrank while it was being sent",
                )));
            }
            encode_data(kind::DATA, &chunk[..n], &mut self.wbuf);
            left -= n as u64;
            if self.wbuf.len() >= WRITE_BATCH {
                self.flush()?;
            }
        }
        self.flush()
    }

    fn send_file(
        &mut self,
        remote: &str,
        mode: u32,
        len: u64,
        src: &mut dyn Read,
    ) -> Result<u64, AgentError> {
        let req = Request::WriteFile {
            path: remote.as_bytes().to_vec(),
            mode,
            len,
        };
        check_request(&req)?;
        self.guard(|c| {
            req.encode(&mut c.wbuf);
            c.send_data(src, len)?;
            match c.recv()? {
                Response::FileWritten { len: n } if n == len => Ok(n),
                Response::Error(e) => Err(remote_err(e)),
                other => Err(unexpected("FileWritten", &other)),
            }
        })
    }

    fn recv_file(
        &mut self,
        remote: &str,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, AgentError> {
        let req = Request::ReadFile {
            path: remote.as_bytes().to_vec(),
        };
        check_request(&req)?;
        self.guard(|c| {
            req.encode(&mut c.wbuf);
            c.flush()?;
            let len = match c.recv()? {
                Response::FileStart { len, .. } => len,
                Response::Error(e) => return Err(remote_err(e)),
                other => return Err(unexpected("FileStart", &other)),
            };
            // A local failure must not leave the agent's frames unread: remember it, drain.
            let mut local_err = None;
            let mut got = 0u64;
            loop {
                match c.recv()? {
                    Response::Data(b) => {
                        got += b.len() as u64;
                        if got > len {
                            return Err(AgentError::Protocol(DecodeError::TooLarge {
                                what: "file data",
                                len: got,
                                max: len,
                            }));
                        }
                        if local_err.is_none() {
                            local_err = sink(&b).err();
                        }
                    }
                    Response::FileEnd if got == len => break,
                    Response::FileEnd => {
                        return Err(AgentError::Protocol(DecodeError::Truncated {
                            what: "file data",
                        }))
                    }
                    Response::Error(e) => return Err(remote_err(e)),
                    other => return Err(unexpected("Data or FileEnd", &other)),
                }
            }
            match local_err {
                Some(e) => Err(AgentError::Local(e)),
                None => Ok(got),
            }
        })
    }
}

/// Applies the decoder's own checks to a request before it is sent, so the agent never sees a
/// request it must reject for its shape.
fn check_request(req: &Request) -> Result<(), AgentError> {
    let mut w = Vec::new();
    req.encode(&mut w);
    match protocol::split_frame(&w) {
        Ok(Some((t, p, _))) => protocol::decode_request(t, p)
            .map(drop)
            .map_err(|e| match e {
                DecodeError::TooLarge { what, len, max } => AgentError::TooLarge { what, len, max },
                e => AgentError::Invalid(e),
            }),
        Ok(None) => unreachable!("a whole frame was just encoded"),
        Err(e) => Err(AgentError::Invalid(e)),
    }
}

/// Connects to the agent until it answers a handshake and a ping, or `timeout` passes.
/// `connect` opens a fresh stream each try (a vsock connection to [`super::AGENT_PORT`], a Unix
/// socket); tries back off from 2 ms to 100 ms. Give the streams a read timeout so a hung
/// agent cannot stall a try forever.
///
/// # Example
/// ```no_run
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// let agent = smolvm::agent::wait_ready(
///     || UnixStream::connect("/tmp/agent.sock"),
///     Duration::from_secs(5),
/// )?;
/// # drop(agent);
/// # Ok::<(), smolvm::agent::AgentError>(())
/// ```
pub fn wait_ready<S: Read + Write>(
    mut connect: impl FnMut() -> io::Result<S>,
    timeout: Duration,
) -> Result<AgentClient<S>, AgentError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = connect()
            .map_err(AgentError::Io)
            .and_then(AgentClient::new)
            .and_then(|mut c| c.ping().map(|_| c));
        let last = match attempt {
            Ok(c) => return Ok(c),
            Err(e @ AgentError::VersionMismatch { .. }) => return Err(e),
            Err(e) => e,
        };
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(AgentError::NotReady {
                waited,
                last: Box::new(last),
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{encode_data, split_frame, RemoteError};

    /// A scripted peer: reads go to canned agent frames, writes are recorded.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn script(responses: &[Response]) -> Script {
        let mut w = Vec::new();
        Response::HelloOk {
            version: 1,
            agent_version: "t".into(),
        }
        .encode(&mut w);
        for r in responses {
            r.encode(&mut w);
        }
        Script {
            input: io::Cursor::new(w),
            sent: Vec::new(),
        }
    }

    #[test]
    fn exec_collects_and_sends_stdin() {
        let s = script(&[
            Response::Stdout(b"a".to_vec()),
            Response::Stderr(b"e".to_vec()),
            Response::Stdout(b"b".to_vec()),
            Response::Exit(ExitStatus::Exited(4)),
        ]);
        let mut c = AgentClient::new(s).unwrap();
        let out = c
            .exec(&Command::new("x").stdin(vec![9; MAX_CHUNK + 3]))
            .unwrap();
        assert_eq!(out.stdout, b"ab");
        assert_eq!(out.stderr, b"e");
        assert_eq!(out.status, ExitStatus::Exited(4));
        // Hello, Exec, then two data frames carrying the stdin.
        let sent = &c.get_ref().sent;
        let mut off = 0;
        let mut kinds = Vec::new();
        let mut data = 0;
        while let Some((t, p, used)) = split_frame(&sent[off..]).unwrap() {
            kinds.push(t);
            if t == kind::DATA {
                data += p.len();
            }
            off += used;
        }
        assert_eq!(off, sent.len());
        assert_eq!(kinds, [kind::HELLO, kind::EXEC, kind::DATA, kind::DATA]);
        assert_eq!(data, MAX_CHUNK + 3);
    }

    #[test]
    fn remote_error_keeps_connection_and_garbage_breaks_it() {
        let mut s = script(&[Response::Error(RemoteError {
            code: ErrorCode::SPAWN_FAILED,
            errno: 2,
            message: "nope".into(),
        })]);
        encode_data(0x70, b"junk", s.input.get_mut());
        Response::Pong(AgentInfo {
            protocol_version: 1,
            agent_version: String::new(),
            hostname: String::new(),
            uptime_ms: 0,
        })
        .encode(s.input.get_mut());
        let mut c = AgentClient::new(s).unwrap();
        assert!(matches!(
            c.exec(&Command::new("x")),
            Err(AgentError::Remote { errno: 2, .. })
        ));
        assert!(matches!(c.ping(), Err(AgentError::Protocol(_))));
        assert!(matches!(c.ping(), Err(AgentError::Broken)));
    }

    #[test]
    fn output_limit_and_invalid_requests() {
        let s = script(&[
            Response::Stdout(vec![1; 10]),
            Response::Exit(ExitStatus::Exited(0)),
        ]);
        let mut c = AgentClient::new(s).unwrap();
        c.set_output_limit(5);
        assert!(matches!(
            c.exec(&Command::new("x")),
            Err(AgentError::TooLarge { what: "stdout", .. })
        ));
        assert!(matches!(
            c.write_file("relative", b"", 0o644),
            Err(AgentError::Invalid(_))
        ));
        assert!(matches!(
            c.exec(&Command::new("")),
            Err(AgentError::Invalid(_))
        ));
        assert!(matches!(c.ping(), Err(AgentError::Closed)));
    }

    #[test]
    fn version_mismatch_is_reported() {
        let mut w = Vec::new();
        Response::Error(RemoteError {
            code: ErrorCode::VERSION_MISMATCH,
            errno: 0,
            message: "agent speaks 7..=9".into(),
        })
        .encode(&mut w);
        let s = Script {
            input: io::Cursor::new(w),
            sent: Vec::new(),
        };
        assert!(matches!(
            AgentClient::new(s),
            Err(AgentError::VersionMismatch { .. })
        ));
    }
}

//! The guest-agent wire protocol, shared word for word by the host client
//! ([`crate::agent::AgentClient`]) and the guest agent binary (`guest/agent/`, which includes
//! this file with `#[path]`). It depends on `std` only.
//!
//! The full specification, with the reason for every limit and an example exchange in hex, is
//! `guest/agent/PROTOCOL.md`. In short: every message is a frame
//!
//! ```text
//! u32 LE len | u8 type | payload (len - 1 bytes)        1 <= len <= MAX_FRAME_LEN
//! ```
//!
//! The client opens with [`Request::Hello`]; then it sends one request at a time and reads
//! responses until the one that ends the request. Concurrency comes from several connections.
//!
//! Decoding is total: any byte sequence gives a message or a [`DecodeError`], never a panic,
//! and nothing is allocated beyond what the bytes already received justify.
//!
//! # Example
//! ```
//! use smolvm::agent::protocol::{decode_request, split_frame, Request};
//!
//! let mut wire = Vec::new();
//! Request::Ping.encode(&mut wire);
//! let (kind, payload, used) = split_frame(&wire).unwrap().unwrap();
//! assert_eq!(used, wire.len());
//! assert_eq!(decode_request(kind, payload).unwrap(), Request::Ping);
//! ```

use std::fmt;
use std::io::{self, Read};

/// The protocol version this code speaks. A peer offers a range in [`Request::Hello`]; the
/// agent picks the highest version both sides know. Bump it for any change to an existing
/// message's layout; new message types may be added without a bump (old peers answer them with
/// [`ErrorCode::UNKNOWN_MESSAGE`]).
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::PROTOCOL_VERSION, 1);
/// ```
pub const PROTOCOL_VERSION: u16 = 1;

/// The vsock port the agent listens on inside the guest (any CID).
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::AGENT_PORT, 52);
/// ```
pub const AGENT_PORT: u32 = 52;

/// Bytes in a frame header: the `u32` length and the type byte (a frame's length field counts
/// the type byte, not itself).
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::HEADER_LEN, 5);
/// ```
pub const HEADER_LEN: usize = 5;

/// Largest frame (type byte + payload), 1 MiB. A receiver buffers a whole frame before it
/// decodes it, so this bounds the memory one connection can make its peer hold, on both
/// sides: the host must not let a compromised guest make it allocate without bound, and the
/// agent serves up to 64 connections in a small guest. 1 MiB still fits any realistic command
/// line (Linux itself caps `execve` arguments at about 2 MiB including the environment).
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_FRAME_LEN, 1 << 20);
/// ```
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest payload of a data frame (stdin, stdout, stderr, file contents), 64 KiB: the default
/// Linux pipe capacity, so one read of a child's output becomes at most one frame, and small
/// enough that stdout and stderr chunks interleave with low latency.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_CHUNK, 64 << 10);
/// ```
pub const MAX_CHUNK: usize = 64 << 10;

/// Most `argv` entries in one exec, 4096. Real commands use far fewer; the cap keeps a
/// malformed count from turning into a long loop of tiny entries.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_ARGS, 4096);
/// ```
pub const MAX_ARGS: usize = 4096;

/// Most environment variables in one exec, 4096 (same reason as [`MAX_ARGS`]).
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_ENV_VARS, 4096);
/// ```
pub const MAX_ENV_VARS: usize = 4096;

/// Longest single argument, environment entry or working directory, 128 KiB: Linux's
/// `MAX_ARG_STRLEN`. A longer string would fail in `execve` with `E2BIG` anyway; rejecting it
/// up front gives a clear error.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_STRING_LEN, 128 << 10);
/// ```
pub const MAX_STRING_LEN: usize = 128 << 10;

/// Longest file path, 4096 bytes: Linux's `PATH_MAX`; the kernel refuses longer paths.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_PATH_LEN, 4096);
/// ```
pub const MAX_PATH_LEN: usize = 4096;

/// Longest human-readable text (error messages, versions, host names), 4096 bytes: enough for
/// any useful message, and it keeps a peer from filling logs.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_TEXT_LEN, 4096);
/// ```
pub const MAX_TEXT_LEN: usize = 4096;

/// Most stdin bytes for one exec, 16 MiB. The agent receives all of stdin before it starts the
/// command, so a client that writes its whole input before reading output can never deadlock
/// against a command that writes output before reading input (`cat` with large data). That
/// buffer lives in guest RAM, hence the cap. Larger inputs: [`Request::WriteFile`] them and
/// redirect.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_STDIN, 16 << 20);
/// ```
pub const MAX_STDIN: u64 = 16 << 20;

/// Largest file for [`Request::WriteFile`] / [`Request::ReadFile`], 256 MiB. Files stream in
/// chunks, but a guest root file system is often tmpfs in guest RAM, and the in-memory client
/// calls hold the whole file in the host process: the cap turns a runaway file into a clear
/// error instead of an out-of-memory VMM or guest.
///
/// # Example
/// ```
/// assert_eq!(smolvm::agent::protocol::MAX_FILE_SIZE, 256 << 20);
/// ```
pub const MAX_FILE_SIZE: u64 = 256 << 20;

/// Frame type bytes. Requests (host → agent) are `0x01..=0x3F`, responses (agent → host)
/// `0x81..=0xFF`.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::kind;
/// assert_eq!(kind::PING, 0x02);
/// ```
pub mod kind {
    /// [`super::Request::Hello`].
    pub const HELLO: u8 = 0x01;
    /// [`super::Request::Ping`].
    pub const PING: u8 = 0x02;
    /// [`super::Request::Exec`].
    pub const EXEC: u8 = 0x03;
    /// [`super::Request::Data`].
    pub const DATA: u8 = 0x04;
    /// [`super::Request::WriteFile`].
    pub const WRITE_FILE: u8 = 0x05;
    /// [`super::Request::ReadFile`].
    pub const READ_FILE: u8 = 0x06;
    /// [`super::Response::HelloOk`].
    pub const HELLO_OK: u8 = 0x81;
    /// [`super::Response::Pong`].
    pub const PONG: u8 = 0x82;
    /// [`super::Response::Stdout`].
    pub const STDOUT: u8 = 0x83;
    /// [`super::Response::Stderr`].
    pub const STDERR: u8 = 0x84;
    /// [`super::Response::Exit`].
    pub const EXIT: u8 = 0x85;
    /// [`super::Response::FileWritten`].
    pub const FILE_WRITTEN: u8 = 0x86;
    /// [`super::Response::FileStart`].
    pub const FILE_START: u8 = 0x87;
    /// [`super::Response::Data`].
    pub const FILE_DATA: u8 = 0x88;
    /// [`super::Response::FileEnd`].
    pub const FILE_END: u8 = 0x89;
    /// [`super::Response::Error`].
    pub const ERROR: u8 = 0xFF;
}

/// Why a byte sequence is not a valid frame or message.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{decode_request, DecodeError};
/// assert!(matches!(decode_request(0x7E, &[]), Err(DecodeError::UnknownType(0x7E))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame length field is 0 (a frame always holds its type byte).
    EmptyFrame,
    /// The frame length field is larger than [`MAX_FRAME_LEN`].
    FrameTooLarge {
        /// The announced length.
        len: u32,
    },
    /// The type byte names no message of this direction.
    UnknownType(u8),
    /// The payload ended inside a field.
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The payload has bytes after the last field.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A length or size is over its limit.
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field holds a value the protocol does not allow.
    Invalid {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyFrame => write!(f, "frame length 0 (a frame holds at least its type byte)"),
            Self::FrameTooLarge { len } => {
                write!(
                    f,
                    "frame length {len} exceeds the limit of {MAX_FRAME_LEN} bytes"
                )
            }
            Self::UnknownType(t) => write!(f, "unknown message type {t:#04x}"),
            Self::Truncated { what } => write!(f, "message ends inside {what}"),
            Self::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes after the message")
            }
            Self::TooLarge { what, len, max } => {
                write!(f, "{what} is {len}, over the limit of {max}")
            }
            Self::Invalid { what, why } => write!(f, "invalid {what}: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The [`ErrorCode`] an agent answers this decode error with.
    ///
    /// # Example
    /// ```
    /// use smolvm::agent::protocol::{DecodeError, ErrorCode};
    /// assert_eq!(DecodeError::UnknownType(9).code(), ErrorCode::UNKNOWN_MESSAGE);
    /// ```
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownType(_) => ErrorCode::UNKNOWN_MESSAGE,
            Self::FrameTooLarge { .. } | Self::TooLarge { .. } => ErrorCode::TOO_LARGE,
            Self::Invalid { .. } => ErrorCode::INVALID_ARGUMENT,
            _ => ErrorCode::MALFORMED,
        }
    }
}

/// Why [`read_frame`] did not return a frame.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{read_frame, ReadFrameError};
/// let mut buf = Vec::new();
/// let bytes = [0u8, 0, 0, 0, 0]; // length 0
/// assert!(matches!(read_frame(&mut &bytes[..], &mut buf), Err(ReadFrameError::Decode(_))));
/// ```
#[derive(Debug)]
pub enum ReadFrameError {
    /// The stream failed or ended inside a frame (`UnexpectedEof`).
    Io(io::Error),
    /// The header is invalid; the stream cannot be resynchronised.
    Decode(DecodeError),
}

impl fmt::Display for ReadFrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Decode(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadFrameError {}

/// Checks a frame's length field (the first 4 bytes) and returns the length of the rest of
/// the frame (type byte + payload). A receiver checks it before it waits for more bytes.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{parse_len, DecodeError};
/// assert_eq!(parse_len([3, 0, 0, 0]), Ok(3));
/// assert_eq!(parse_len([0, 0, 0, 0]), Err(DecodeError::EmptyFrame));
/// ```
pub fn parse_len(h: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(h);
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len as usize > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge { len });
    }
    Ok(len as usize)
}

/// Splits the first frame off `bytes`: `Ok(Some((type, payload, bytes used)))`, `Ok(None)`
/// when more bytes are needed, or the length field's error (reported as soon as its 4 bytes
/// are there).
///
/// # Example
/// ```
/// use smolvm::agent::protocol::split_frame;
/// assert_eq!(split_frame(&[1, 0, 0, 0, 0x02, 9]), Ok(Some((0x02, &[][..], 5))));
/// assert_eq!(split_frame(&[2, 0, 0, 0, 0x02]), Ok(None));
/// assert!(split_frame(&[0, 0, 0, 0]).is_err());
/// ```
#[allow(clippy::type_complexity)] // (type, payload, bytes used): clearer spelled out
pub fn split_frame(bytes: &[u8]) -> Result<Option<(u8, &[u8], usize)>, DecodeError> {
    let Some(h) = bytes.get(..4) else {
        return Ok(None);
    };
    let len = parse_len([h[0], h[1], h[2], h[3]])?;
    Ok(bytes.get(4..4 + len).map(|f| (f[0], &f[1..], 4 + len)))
}

fn read_full<R: Read + ?Sized>(
    r: &mut R,
    b: &mut [u8],
    first: bool,
) -> Result<bool, ReadFrameError> {
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 && first => return Ok(false),
            Ok(0) => {
                return Err(ReadFrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a frame",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    Ok(true)
}

/// Reads one frame from `r` into `buf` (replacing its contents with the payload) and returns
/// its type; `Ok(None)` on a clean end of stream before the first byte of a frame. The length
/// field is checked before anything else is read, and the payload buffer grows only as bytes
/// arrive.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{read_frame, Request};
/// let mut wire = Vec::new();
/// Request::Ping.encode(&mut wire);
/// let mut buf = Vec::new();
/// let mut r = &wire[..];
/// assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(0x02));
/// assert_eq!(read_frame(&mut r, &mut buf).unwrap(), None);
/// ```
pub fn read_frame<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<u8>, ReadFrameError> {
    let mut h = [0u8; 4];
    if !read_full(r, &mut h, true)? {
        return Ok(None);
    }
    let len = parse_len(h).map_err(ReadFrameError::Decode)?;
    let mut t = [0u8; 1];
    read_full(r, &mut t, false)?;
    let payload = len - 1;
    buf.clear();
    let n = r
        .take(payload as u64)
        .read_to_end(buf)
        .map_err(ReadFrameError::Io)?;
    if n < payload {
        return Err(ReadFrameError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a frame",
        )));
    }
    Ok(Some(t[0]))
}

/// A protocol error code carried by [`Response::Error`]. Unknown codes from newer peers are
/// kept as they are.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::ErrorCode;
/// assert_eq!(ErrorCode::SPAWN_FAILED.name(), "spawn failed");
/// assert_eq!(ErrorCode(999).name(), "unknown error");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The frame or message could not be decoded.
    pub const MALFORMED: Self = Self(1);
    /// The message type is unknown to the agent.
    pub const UNKNOWN_MESSAGE: Self = Self(2);
    /// A size or count is over a protocol limit.
    pub const TOO_LARGE: Self = Self(3);
    /// No protocol version in common.
    pub const VERSION_MISMATCH: Self = Self(4);
    /// The message is valid but not allowed now (e.g. a request before `Hello`).
    pub const UNEXPECTED: Self = Self(5);
    /// The command could not be started (`errno` says why, e.g. `ENOENT`).
    pub const SPAWN_FAILED: Self = Self(6);
    /// A file operation failed (`errno` says why).
    pub const IO: Self = Self(7);
    /// An argument is invalid (e.g. a relative path, an empty argv).
    pub const INVALID_ARGUMENT: Self = Self(8);
    /// The agent serves its maximum number of connections.
    pub const BUSY: Self = Self(9);
    /// An internal failure in the agent.
    pub const INTERNAL: Self = Self(10);

    /// A short name for the code.
    ///
    /// # Example
    /// ```
    /// assert_eq!(smolvm::agent::protocol::ErrorCode::IO.name(), "I/O error");
    /// ```
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "malformed message",
            2 => "unknown message",
            3 => "too large",
            4 => "version mismatch",
            5 => "unexpected message",
            6 => "spawn failed",
            7 => "I/O error",
            8 => "invalid argument",
            9 => "busy",
            10 => "internal error",
            _ => "unknown error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// How a command ended.
///
/// # Example
/// ```
/// use smolvm::agent::ExitStatus;
/// assert!(ExitStatus::Exited(0).success());
/// assert!(!ExitStatus::Signaled(9).success());
/// assert_eq!(ExitStatus::Exited(3).code(), Some(3));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// It ran past its timeout; the agent killed its whole process group with `SIGKILL`.
    TimedOut,
}

impl ExitStatus {
    /// Exited with code 0.
    ///
    /// # Example
    /// ```
    /// assert!(smolvm::agent::ExitStatus::Exited(0).success());
    /// ```
    pub fn success(self) -> bool {
        self == Self::Exited(0)
    }

    /// The exit code, when it exited.
    ///
    /// # Example
    /// ```
    /// assert_eq!(smolvm::agent::ExitStatus::TimedOut.code(), None);
    /// ```
    pub fn code(self) -> Option<i32> {
        match self {
            Self::Exited(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(c) => write!(f, "exit code {c}"),
            Self::Signaled(s) => write!(f, "killed by signal {s}"),
            Self::TimedOut => write!(f, "timed out (process group killed)"),
        }
    }
}

/// An exec request: what to run and how. The stdin bytes follow in `stdin_len` bytes of
/// [`Request::Data`] frames.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::ExecRequest;
/// let req = ExecRequest { argv: vec![b"true".to_vec()], ..Default::default() };
/// assert!(req.validate().is_ok());
/// assert!(ExecRequest::default().validate().is_err()); // empty argv
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<Vec<u8>>,
    /// Variables to set (added to the agent's environment unless `clear_env`).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Start from an empty environment.
    pub clear_env: bool,
    /// Working directory (the agent's, `/` as init, when `None`).
    pub cwd: Option<Vec<u8>>,
    /// Timeout in milliseconds; 0 means none.
    pub timeout_ms: u64,
    /// Stdin bytes that follow in data frames (at most [`MAX_STDIN`]).
    pub stdin_len: u64,
}

fn check_str(what: &'static str, s: &[u8], max: usize) -> Result<(), DecodeError> {
    if s.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            len: s.len() as u64,
            max: max as u64,
        });
    }
    if s.contains(&0) {
        return Err(DecodeError::Invalid {
            what,
            why: "contains a NUL byte",
        });
    }
    Ok(())
}

fn check_path(p: &[u8]) -> Result<(), DecodeError> {
    check_str("path", p, MAX_PATH_LEN)?;
    if p.first() != Some(&b'/') {
        return Err(DecodeError::Invalid {
            what: "path",
            why: "must be absolute",
        });
    }
    Ok(())
}

impl ExecRequest {
    /// Checks every limit and rule of the protocol (both peers call this).
    ///
    /// # Example
    /// ```
    /// use smolvm::agent::protocol::ExecRequest;
    /// let req = ExecRequest { argv: vec![b"a\0b".to_vec()], ..Default::default() };
    /// assert!(req.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.argv.is_empty() {
            return Err(DecodeError::Invalid {
                what: "argv",
                why: "is empty",
            });
        }
        if self.argv[0].is_empty() {
            return Err(DecodeError::Invalid {
                what: "argv[0]",
                why: "is empty",
            });
        }
        if self.argv.len() > MAX_ARGS {
            return Err(DecodeError::TooLarge {
                what: "argument count",
                len: self.argv.len() as u64,
                max: MAX_ARGS as u64,
            });
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(DecodeError::TooLarge {
                what: "environment variable count",
                len: self.env.len() as u64,
                max: MAX_ENV_VARS as u64,
            });
        }
        for a in &self.argv {
            check_str("argument", a, MAX_STRING_LEN)?;
        }
        for (k, v) in &self.env {
            check_str("environment name", k, MAX_STRING_LEN)?;
            check_str("environment value", v, MAX_STRING_LEN)?;
            if k.is_empty() || k.contains(&b'=') {
                return Err(DecodeError::Invalid {
                    what: "environment name",
                    why: "is empty or contains '='",
                });
            }
        }
        if let Some(c) = &self.cwd {
            check_str("working directory", c, MAX_PATH_LEN)?;
            if c.is_empty() {
                return Err(DecodeError::Invalid {
                    what: "working directory",
                    why: "is empty",
                });
            }
        }
        if self.stdin_len > MAX_STDIN {
            return Err(DecodeError::TooLarge {
                what: "stdin length",
                len: self.stdin_len,
                max: MAX_STDIN,
            });
        }
        Ok(())
    }
}

/// A message from the host to the agent.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{decode_request, split_frame, Request};
/// let req = Request::ReadFile { path: b"/etc/hostname".to_vec() };
/// let mut wire = Vec::new();
/// req.encode(&mut wire);
/// let (k, p, _) = split_frame(&wire).unwrap().unwrap();
/// assert_eq!(decode_request(k, p).unwrap(), req);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Opens the conversation: the range of versions the client speaks. Answered by
    /// [`Response::HelloOk`] or an [`ErrorCode::VERSION_MISMATCH`] error.
    Hello {
        /// Lowest version the client speaks.
        min_version: u16,
        /// Highest version the client speaks.
        max_version: u16,
    },
    /// Asks for [`Response::Pong`].
    Ping,
    /// Runs a command: answered by [`Response::Stdout`] / [`Response::Stderr`] chunks and a
    /// final [`Response::Exit`], or an error.
    Exec(ExecRequest),
    /// A chunk of stdin or file contents (at most [`MAX_CHUNK`] bytes).
    Data(Vec<u8>),
    /// Writes a file atomically: `len` bytes follow in [`Request::Data`] frames; answered by
    /// [`Response::FileWritten`] or an error after the last byte.
    WriteFile {
        /// Absolute path.
        path: Vec<u8>,
        /// Permission bits (`0o644`...).
        mode: u32,
        /// Total bytes (at most [`MAX_FILE_SIZE`]).
        len: u64,
    },
    /// Reads a file: answered by [`Response::FileStart`], [`Response::Data`] chunks and
    /// [`Response::FileEnd`], or an error.
    ReadFile {
        /// Absolute path.
        path: Vec<u8>,
    },
}

/// What the agent reports in [`Response::Pong`].
///
/// # Example
/// ```
/// let info = smolvm::agent::AgentInfo {
///     protocol_version: 1,
///     agent_version: "0.1.0".into(),
///     hostname: "sandbox".into(),
///     uptime_ms: 1200,
/// };
/// assert_eq!(info.uptime_ms, 1200);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The negotiated protocol version.
    pub protocol_version: u16,
    /// The agent's own version (its crate version).
    pub agent_version: String,
    /// The guest's host name.
    pub hostname: String,
    /// Milliseconds since the guest booted (`CLOCK_BOOTTIME`).
    pub uptime_ms: u64,
}

/// An error the agent reports instead of a result.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{ErrorCode, RemoteError};
/// let e = RemoteError { code: ErrorCode::SPAWN_FAILED, errno: 2, message: "no such file".into() };
/// assert_eq!(e.errno, libc::ENOENT);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The guest `errno` behind it, or 0.
    pub errno: i32,
    /// A human-readable explanation.
    pub message: String,
}

/// A message from the agent to the host.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{decode_response, split_frame, Response};
/// use smolvm::agent::ExitStatus;
/// let mut wire = Vec::new();
/// Response::Exit(ExitStatus::Signaled(9)).encode(&mut wire);
/// let (k, p, _) = split_frame(&wire).unwrap().unwrap();
/// assert_eq!(decode_response(k, p).unwrap(), Response::Exit(ExitStatus::Signaled(9)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The handshake succeeded.
    HelloOk {
        /// The version both sides will speak.
        version: u16,
        /// The agent's own version.
        agent_version: String,
    },
    /// Answer to [`Request::Ping`].
    Pong(AgentInfo),
    /// A chunk of the command's stdout, as produced.
    Stdout(Vec<u8>),
    /// A chunk of the command's stderr, as produced.
    Stderr(Vec<u8>),
    /// The command ended; last message of an exec.
    Exit(ExitStatus),
    /// The file was written (and renamed into place).
    FileWritten {
        /// Bytes written.
        len: u64,
    },
    /// A file read starts.
    FileStart {
        /// The file's size when opened.
        len: u64,
        /// Its permission bits.
        mode: u32,
    },
    /// A chunk of file contents.
    Data(Vec<u8>),
    /// A file read ended (after exactly the announced bytes).
    FileEnd,
    /// The request failed; last message of a request.
    Error(RemoteError),
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// Appends one frame to `out`: header, then whatever `body` writes.
fn frame(out: &mut Vec<u8>, t: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, t]);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends a data-carrying frame (`kind::DATA`, `STDOUT`, `STDERR`, `FILE_DATA`) without
/// copying `data` into a message first.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{encode_data, kind};
/// let mut out = Vec::new();
/// encode_data(kind::STDOUT, b"hi", &mut out);
/// assert_eq!(out, [3, 0, 0, 0, 0x83, b'h', b'i']);
/// ```
pub fn encode_data(t: u8, data: &[u8], out: &mut Vec<u8>) {
    frame(out, t, |o| o.extend_from_slice(data));
}

impl Request {
    /// Appends this message as one frame to `out`. Encoding does not check limits; call
    /// [`ExecRequest::validate`] first and check the frame against [`MAX_FRAME_LEN`].
    ///
    /// # Example
    /// ```
    /// let mut out = Vec::new();
    /// smolvm::agent::protocol::Request::Ping.encode(&mut out);
    /// assert_eq!(out, [1, 0, 0, 0, 0x02]);
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Hello {
                min_version,
                max_version,
            } => frame(out, kind::HELLO, |o| {
                o.extend_from_slice(&min_version.to_le_bytes());
                o.extend_from_slice(&max_version.to_le_bytes());
            }),
            Self::Ping => frame(out, kind::PING, |_| {}),
            Self::Exec(e) => frame(out, kind::EXEC, |o| {
                o.extend_from_slice(&e.timeout_ms.to_le_bytes());
                o.extend_from_slice(&e.stdin_len.to_le_bytes());
                let flags = u8::from(e.clear_env) | (u8::from(e.cwd.is_some()) << 1);
                o.push(flags);
                if let Some(c) = &e.cwd {
                    put_bytes(o, c);
                }
                o.extend_from_slice(&(e.argv.len() as u32).to_le_bytes());
                for a in &e.argv {
                    put_bytes(o, a);
                }
                o.extend_from_slice(&(e.env.len() as u32).to_le_bytes());
                for (k, v) in &e.env {
                    put_bytes(o, k);
                    put_bytes(o, v);
                }
            }),
            Self::Data(d) => encode_data(kind::DATA, d, out),
            Self::WriteFile { path, mode, len } => frame(out, kind::WRITE_FILE, |o| {
                o.extend_from_slice(&len.to_le_bytes());
                o.extend_from_slice(&mode.to_le_bytes());
                put_bytes(o, path);
            }),
            Self::ReadFile { path } => frame(out, kind::READ_FILE, |o| put_bytes(o, path)),
        }
    }
}

impl Response {
    /// Appends this message as one frame to `out`.
    ///
    /// # Example
    /// ```
    /// let mut out = Vec::new();
    /// smolvm::agent::protocol::Response::FileEnd.encode(&mut out);
    /// assert_eq!(out, [1, 0, 0, 0, 0x89]);
    /// ```
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::HelloOk {
                version,
                agent_version,
            } => frame(out, kind::HELLO_OK, |o| {
                o.extend_from_slice(&version.to_le_bytes());
                put_bytes(o, agent_version.as_bytes());
            }),
            Self::Pong(i) => frame(out, kind::PONG, |o| {
                o.extend_from_slice(&i.protocol_version.to_le_bytes());
                o.extend_from_slice(&i.uptime_ms.to_le_bytes());
                put_bytes(o, i.agent_version.as_bytes());
                put_bytes(o, i.hostname.as_bytes());
            }),
            Self::Stdout(d) => encode_data(kind::STDOUT, d, out),
            Self::Stderr(d) => encode_data(kind::STDERR, d, out),
            Self::Exit(s) => frame(out, kind::EXIT, |o| {
                let (k, v) = match *s {
                    ExitStatus::Exited(c) => (0u8, c),
                    ExitStatus::Signaled(s) => (1, s),
                    ExitStatus::TimedOut => (2, 0),
                };
                o.push(k);
                o.extend_from_slice(&v.to_le_bytes());
            }),
            Self::FileWritten { len } => frame(out, kind::FILE_WRITTEN, |o| {
                o.extend_from_slice(&len.to_le_bytes())
            }),
            Self::FileStart { len, mode } => frame(out, kind::FILE_START, |o| {
                o.extend_from_slice(&len.to_le_bytes());
                o.extend_from_slice(&mode.to_le_bytes());
            }),
            Self::Data(d) => encode_data(kind::FILE_DATA, d, out),
            Self::FileEnd => frame(out, kind::FILE_END, |_| {}),
            Self::Error(e) => frame(out, kind::ERROR, |o| {
                o.extend_from_slice(&e.code.0.to_le_bytes());
                o.extend_from_slice(&e.errno.to_le_bytes());
                put_bytes(o, e.message.as_bytes());
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding.

/// A cursor over a payload; every read checks the remaining length first.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated { what });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A `u32`-length-prefixed byte string of at most `max` bytes.
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(DecodeError::TooLarge {
                what,
                len: len as u64,
                max: max as u64,
            });
        }
        self.take(len, what)
    }
    fn text(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what, MAX_TEXT_LEN)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid {
                what,
                why: "is not UTF-8",
            })
    }
    /// A count of items each at least `min_item` bytes long: checked against `max` and against
    /// the bytes left, so no loop or allocation runs ahead of the data.
    fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError::TooLarge {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        if n.saturating_mul(min_item) > self.b.len() {
            return Err(DecodeError::Truncated { what });
        }
        Ok(n)
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                extra: self.b.len(),
            })
        }
    }
}

fn data(p: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if p.len() > MAX_CHUNK {
        return Err(DecodeError::TooLarge {
            what: "data chunk",
            len: p.len() as u64,
            max: MAX_CHUNK as u64,
        });
    }
    Ok(p.to_vec())
}

/// Decodes a request frame's payload (as split off by [`split_frame`] or [`read_frame`]).
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{decode_request, DecodeError};
/// assert_eq!(decode_request(0x01, &[1, 0]), Err(DecodeError::Truncated { what: "max_version" }));
/// ```
pub fn decode_request(t: u8, payload: &[u8]) -> Result<Request, DecodeError> {
    let mut r = Reader { b: payload };
    let req = match t {
        kind::HELLO => Request::Hello {
            min_version: r.u16("min_version")?,
            max_version: r.u16("max_version")?,
        },
        kind::PING => Request::Ping,
        kind::EXEC => {
            let timeout_ms = r.u64("timeout")?;
            let stdin_len = r.u64("stdin length")?;
            let flags = r.u8("flags")?;
            if flags & !3 != 0 {
                return Err(DecodeError::Invalid {
                    what: "exec flags",
                    why: "unknown bits set",
                });
            }
            let cwd = if flags & 2 != 0 {
                Some(r.bytes("working directory", MAX_PATH_LEN)?.to_vec())
            } else {
                None
            };
            let argc = r.count("argument count", MAX_ARGS, 4)?;
            let mut argv = Vec::with_capacity(argc);
            for _ in 0..argc {
                argv.push(r.bytes("argument", MAX_STRING_LEN)?.to_vec());
            }
            let envc = r.count("environment variable count", MAX_ENV_VARS, 8)?;
            let mut env = Vec::with_capacity(envc);
            for _ in 0..envc {
                let k = r.bytes("environment name", MAX_STRING_LEN)?.to_vec();
                let v = r.bytes("environment value", MAX_STRING_LEN)?.to_vec();
                env.push((k, v));
            }
            let e = ExecRequest {
                argv,
                env,
                clear_env: flags & 1 != 0,
                cwd,
                timeout_ms,
                stdin_len,
            };
            r.finish()?;
            e.validate()?;
            return Ok(Request::Exec(e));
        }
        kind::DATA => return data(payload).map(Request::Data),
        kind::WRITE_FILE => {
            let len = r.u64("file length")?;
            let mode = r.u32("mode")?;
            let path = r.bytes("path", MAX_PATH_LEN)?.to_vec();
            check_path(&path)?;
            if len > MAX_FILE_SIZE {
                return Err(DecodeError::TooLarge {
                    what: "file length",
                    len,
                    max: MAX_FILE_SIZE,
                });
            }
            if mode & !0o7777 != 0 {
                return Err(DecodeError::Invalid {
                    what: "mode",
                    why: "has bits outside 0o7777",
                });
            }
            Request::WriteFile { path, mode, len }
        }
        kind::READ_FILE => {
            let path = r.bytes("path", MAX_PATH_LEN)?.to_vec();
            check_path(&path)?;
            Request::ReadFile { path }
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(req)
}

/// Decodes a response frame's payload.
///
/// # Example
/// ```
/// use smolvm::agent::protocol::{decode_response, Response};
/// assert_eq!(decode_response(0x89, &[]).unwrap(), Response::FileEnd);
/// assert!(decode_response(0x85, &[7, 0, 0, 0, 0]).is_err()); // unknown exit kind
/// ```
pub fn decode_response(t: u8, payload: &[u8]) -> Result<Response, DecodeError> {
    let mut r = Reader { b: payload };
    let resp = match t {
        kind::HELLO_OK => Response::HelloOk {
            version: r.u16("version")?,
            agent_version: r.text("agent version")?,
        },
        kind::PONG => Response::Pong(AgentInfo {
            protocol_version: r.u16("version")?,
            uptime_ms: r.u64("uptime")?,
            agent_version: r.text("agent version")?,
            hostname: r.text("hostname")?,
        }),
        kind::STDOUT => return data(payload).map(Response::Stdout),
        kind::STDERR => return data(payload).map(Response::Stderr),
        kind::FILE_DATA => return data(payload).map(Response::Data),
        kind::EXIT => {
            let k = r.u8("exit kind")?;
            let v = r.i32("exit value")?;
            Response::Exit(match k {
                0 => ExitStatus::Exited(v),
                1 => ExitStatus::Signaled(v),
                2 if v == 0 => ExitStatus::TimedOut,
                2 => {
                    return Err(DecodeError::Invalid {
                        what: "exit value",
                        why: "must be 0 for a timeout",
                    })
                }
                _ => {
                    return Err(DecodeError::Invalid {
                        what: "exit kind",
                        why: "not 0, 1 or 2",
                    })
                }
            })
        }
        kind::FILE_WRITTEN => Response::FileWritten {
            len: r.u64("file length")?,
        },
        kind::FILE_START => {
            let len = r.u64("file length")?;
            if len > MAX_FILE_SIZE {
                return Err(DecodeError::TooLarge {
                    what: "file length",
                    len,
                    max: MAX_FILE_SIZE,
                });
            }
            Response::FileStart {
                len,
                mode: r.u32("mode")?,
            }
        }
        kind::FILE_END => Response::FileEnd,
        kind::ERROR => Response::Error(RemoteError {
            code: ErrorCode(r.u16("error code")?),
            errno: r.i32("errno")?,
            message: r.text("error message")?,
        }),
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_req(req: Request) {
        let mut w = Vec::new();
        req.encode(&mut w);
        let (t, p, used) = split_frame(&w).unwrap().unwrap();
        assert_eq!(used, w.len());
        assert_eq!(decode_request(t, p).unwrap(), req);
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut &w[..], &mut buf).unwrap(), Some(t));
        assert_eq!(buf, p);
    }

    fn roundtrip_resp(resp: Response) {
        let mut w = Vec::new();
        resp.encode(&mut w);
        let (t, p, used) = split_frame(&w).unwrap().unwrap();
        assert_eq!(used, w.len());
        assert_eq!(decode_response(t, p).unwrap(), resp);
    }

    fn full_exec() -> ExecRequest {
        ExecRequest {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \xff".to_vec()],
            env: vec![
                (b"K".to_vec(), b"V=1".to_vec()),
                (b"E".to_vec(), Vec::new()),
            ],
            clear_env: true,
            cwd: Some(b"/tmp".to_vec()),
            timeout_ms: 1500,
            stdin_len: 77,
        }
    }

    #[test]
    fn requests_round_trip() {
        roundtrip_req(Request::Hello {
            min_version: 1,
            max_version: 9,
        });
        roundtrip_req(Request::Ping);
        roundtrip_req(Request::Exec(full_exec()));
        roundtrip_req(Request::Exec(ExecRequest {
            argv: vec![b"true".to_vec()],
            ..Default::default()
        }));
        roundtrip_req(Request::Data(vec![0, 1, 2, 255]));
        roundtrip_req(Request::Data(vec![7; MAX_CHUNK]));
        roundtrip_req(Request::WriteFile {
            path: b"/a/b".to_vec(),
            mode: 0o755,
            len: MAX_FILE_SIZE,
        });
        roundtrip_req(Request::ReadFile {
            path: b"/".to_vec(),
        });
    }

    #[test]
    fn responses_round_trip() {
        roundtrip_resp(Response::HelloOk {
            version: 1,
            agent_version: "0.1.0".into(),
        });
        roundtrip_resp(Response::Pong(AgentInfo {
            protocol_version: 1,
            agent_version: "x".into(),
            hostname: "h".into(),
            uptime_ms: u64::MAX,
        }));
        roundtrip_resp(Response::Stdout(b"out".to_vec()));
        roundtrip_resp(Response::Stderr(Vec::new()));
        for s in [
            ExitStatus::Exited(-1),
            ExitStatus::Exited(0),
            ExitStatus::Signaled(15),
            ExitStatus::TimedOut,
        ] {
            roundtrip_resp(Response::Exit(s));
        }
        roundtrip_resp(Response::FileWritten { len: 5 });
        roundtrip_resp(Response::FileStart {
            len: 5,
            mode: 0o600,
        });
        roundtrip_resp(Response::Data(vec![1; 10]));
        roundtrip_resp(Response::FileEnd);
        roundtrip_resp(Response::Error(RemoteError {
            code: ErrorCode(4242),
            errno: 2,
            message: "nope".into(),
        }));
    }

    #[test]
    fn header_errors() {
        assert_eq!(split_frame(&[0, 0, 0, 0]), Err(DecodeError::EmptyFrame));
        let big = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        assert_eq!(
            split_frame(&[big[0], big[1], big[2], big[3], 1]),
            Err(DecodeError::FrameTooLarge {
                len: MAX_FRAME_LEN as u32 + 1
            })
        );
        assert_eq!(split_frame(&[1, 0, 0]), Ok(None));
        // A zero length is refused without waiting for a type byte that will never come.
        let e = read_frame(&mut &[0u8, 0, 0, 0][..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ReadFrameError::Decode(DecodeError::EmptyFrame)));
        // A truncated stream is an I/O error, not a panic or a hang.
        let mut buf = Vec::new();
        let e = read_frame(&mut &[9u8, 0, 0, 0, 2, 1][..], &mut buf).unwrap_err();
        assert!(matches!(e, ReadFrameError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
        let e = read_frame(&mut &[9u8, 0][..], &mut buf).unwrap_err();
        assert!(matches!(e, ReadFrameError::Io(_)));
        // A huge announced length allocates nothing up front.
        let e = read_frame(&mut &[0xff, 0xff, 0xff, 0xff, 3][..], &mut buf).unwrap_err();
        assert!(matches!(
            e,
            ReadFrameError::Decode(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn message_errors() {
        assert_eq!(
            decode_request(0x40, &[]),
            Err(DecodeError::UnknownType(0x40))
        );
        assert_eq!(
            decode_response(kind::PING, &[]),
            Err(DecodeError::UnknownType(2))
        );
        assert_eq!(
            decode_request(kind::PING, &[0]),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );
        // Every strict prefix of a valid exec fails cleanly.
        let mut w = Vec::new();
        Request::Exec(full_exec()).encode(&mut w);
        for n in HEADER_LEN..w.len() {
            assert!(
                decode_request(kind::EXEC, &w[HEADER_LEN..n]).is_err(),
                "prefix {n}"
            );
        }
        // A huge argc with no bytes behind it is refused before any loop or allocation.
        let mut p = vec![0u8; 17];
        p.extend_from_slice(&(MAX_ARGS as u32).to_le_bytes());
        assert_eq!(
            decode_request(kind::EXEC, &p),
            Err(DecodeError::Truncated {
                what: "argument count"
            })
        );
        let mut p = vec![0u8; 17];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_request(kind::EXEC, &p),
            Err(DecodeError::TooLarge { .. })
        ));
        // Empty argv, NUL bytes, relative paths, oversize chunks.
        let mut p = vec![0u8; 17];
        p.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_request(kind::EXEC, &p),
            Err(DecodeError::Invalid { what: "argv", .. })
        ));
        let bad = Request::ReadFile {
            path: b"rel".to_vec(),
        };
        let mut w = Vec::new();
        bad.encode(&mut w);
        assert!(matches!(
            decode_request(kind::READ_FILE, &w[HEADER_LEN..]),
            Err(DecodeError::Invalid { what: "path", .. })
        ));
        assert!(matches!(
            decode_request(kind::DATA, &vec![0; MAX_CHUNK + 1]),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut e = full_exec();
        e.env[0].0 = b"A=B".to_vec();
        assert!(e.validate().is_err());
        e = full_exec();
        e.stdin_len = MAX_STDIN + 1;
        assert!(e.validate().is_err());
        assert!(decode_response(kind::ERROR, &[1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xfe]).is_err());
        assert_eq!(DecodeError::EmptyFrame.code(), ErrorCode::MALFORMED);
        // Found by fuzzing: a timeout with a non-zero value would not re-encode identically.
        assert!(decode_response(kind::EXIT, &[2, 2, 2, 2, 0]).is_err());
    }
}

//! One connection: the handshake, then one request at a time until the peer closes.

use std::fs::File;
use std::io::{self, BufReader, Write};

use crate::protocol::{
    decode_request, encode_data, kind, read_frame, AgentInfo, DecodeError, ErrorCode,
    ReadFrameError, RemoteError, Request, Response, PROTOCOL_VERSION,
};
use crate::{exec, files};

/// Outgoing bytes gathered before one write to the socket.
pub const WRITE_BATCH: usize = 256 << 10;

/// A connection: buffered reads, batched writes.
pub struct Conn {
    rd: BufReader<File>,
    wr: File,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// How a data sequence (stdin, file contents) ended.
pub enum DataEnd {
    /// All announced bytes arrived.
    Complete,
    /// The peer broke the sequence; an error reply was sent, the request is abandoned.
    Aborted,
}

impl Conn {
    /// Queues a response.
    pub fn queue(&mut self, r: &Response) {
        r.encode(&mut self.out);
    }

    /// Queues a data frame (`kind::STDOUT`, ...).
    pub fn queue_data(&mut self, t: u8, data: &[u8]) {
        encode_data(t, data, &mut self.out);
    }

    /// Writes what is queued once enough has gathered.
    pub fn maybe_flush(&mut self) -> io::Result<()> {
        if self.out.len() >= WRITE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        self.wr.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// Sends one response now.
    pub fn send(&mut self, r: &Response) -> io::Result<()> {
        self.queue(r);
        self.flush()
    }

    /// Sends an error response now.
    pub fn send_error(&mut self, code: ErrorCode, errno: i32, message: String) -> io::Result<()> {
        let mut message = message;
        truncate_text(&mut message);
        self.send(&Response::Error(RemoteError {
            code,
            errno,
            message,
        }))
    }

    /// Receives exactly `len` bytes of `Data` frames, handing each chunk to `sink`. On a
    /// protocol violation replies with an error and returns [`DataEnd::Aborted`]; `Err` means
    /// the connection is unusable.
    pub fn recv_data(&mut self, len: u64, mut sink: impl FnMut(&[u8])) -> io::Result<DataEnd> {
        let mut left = len;
        while left > 0 {
            let t = match read_frame(&mut self.rd, &mut self.buf) {
                Ok(Some(t)) => t,
                Ok(None) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Err(ReadFrameError::Io(e)) => return Err(e),
                Err(ReadFrameError::Decode(e)) => {
                    self.send_error(e.code(), 0, format!("{e}; closing the connection"))?;
                    return Err(io::ErrorKind::InvalidData.into());
                }
            };
            let why = match decode_request(t, &self.buf) {
                Ok(Request::Data(_)) if self.buf.len() as u64 > left => format!(
                    "a data frame of {} bytes overruns the {left} bytes still expected",
                    self.buf.len()
                ),
                Ok(Request::Data(_)) => {
                    sink(&self.buf);
                    left -= self.buf.len() as u64;
                    continue;
                }
                Ok(_) => format!(
                    "a request (type {t:#04x}) arrived while {left} data bytes were still expected"
                ),
                Err(e) => format!("{e}"),
            };
            self.send_error(
                ErrorCode::UNEXPECTED,
                0,
                format!("{why}; request abandoned"),
            )?;
            return Ok(DataEnd::Aborted);
        }
        Ok(DataEnd::Complete)
    }
}

fn truncate_text(s: &mut String) {
    if s.len() > crate::protocol::MAX_TEXT_LEN {
        let mut end = crate::protocol::MAX_TEXT_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Tells a client over the connection limit to come back later, then closes.
pub fn refuse_busy(mut stream: File, max: usize) {
    let mut out = Vec::new();
    Response::Error(RemoteError {
        code: ErrorCode::BUSY,
        errno: libc::EAGAIN,
        message: format!("the agent serves its maximum of {max} connections; retry later"),
    })
    .encode(&mut out);
    let _ = stream.write_all(&out);
}

/// Serves one connection until the peer closes or the stream breaks.
pub fn serve(stream: File) {
    let Ok(wr) = stream.try_clone() else {
        return;
    };
    let mut c = Conn {
        rd: BufReader::with_capacity(64 << 10, stream),
        wr,
        buf: Vec::new(),
        out: Vec::with_capacity(4096),
    };
    let _ = serve_requests(&mut c);
}

fn serve_requests(c: &mut Conn) -> io::Result<()> {
    let mut hello = false;
    loop {
        let t = match read_frame(&mut c.rd, &mut c.buf) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(ReadFrameError::Io(e)) => return Err(e),
            Err(ReadFrameError::Decode(e)) => {
                // The stream cannot be resynchronised after a bad header: say why, then close.
                c.send_error(e.code(), 0, format!("{e}; closing the connection"))?;
                return Ok(());
            }
        };
        let req = match decode_request(t, &c.buf) {
            Ok(r) => r,
            Err(e) => {
                reply_decode_error(c, &e)?;
                continue;
            }
        };
        match req {
            Request::Hello {
                min_version,
                max_version,
            } => {
                if (min_version..=max_version).contains(&PROTOCOL_VERSION) {
                    hello = true;
                    c.send(&Response::HelloOk {
                        version: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                    })?;
                } else {
                    c.send_error(
                        ErrorCode::VERSION_MISMATCH,
                        0,
                        format!(
                            "agent speaks protocol {PROTOCOL_VERSION}..={PROTOCOL_VERSION}, \
                             client offered {min_version}..={max_version}"
                        ),
                    )?;
                }
            }
            // Data outside a request is the tail of one already answered with an error (its
            // header was rejected); dropping it keeps the connection in step.
            Request::Data(_) => {}
            _ if !hello => c.send_error(
                ErrorCode::UNEXPECTED,
                0,
                "send Hello first to agree on a protocol version".into(),
            )?,
            Request::Ping => c.send(&Response::Pong(AgentInfo {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                hostname: crate::sys::hostname(),
                uptime_ms: crate::sys::uptime_ms(),
            }))?,
            Request::Exec(e) => exec::run(c, e)?,
            Request::WriteFile { path, mode, len } => files::write(c, &path, mode, len)?,
            Request::ReadFile { path } => files::read(c, &path)?,
        }
    }
}

fn reply_decode_error(c: &mut Conn, e: &DecodeError) -> io::Result<()> {
    let hint = match e {
        DecodeError::UnknownType(_) => "; this agent may be older than the client",
        _ => "",
    };
    c.send_error(e.code(), 0, format!("bad request: {e}{hint}"))
}

/// The data-frame type for a stream: stdout or stderr.
pub fn output_kind(stderr: bool) -> u8 {
    if stderr {
        kind::STDERR
    } else {
        kind::STDOUT
    }
}

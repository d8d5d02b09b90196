//! File requests: atomic writes (temporary file, fsync, rename) and chunked reads.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::conn::{Conn, DataEnd};
use crate::protocol::{kind, ErrorCode, Response, MAX_CHUNK, MAX_FILE_SIZE};

/// Distinguishes temporary files of concurrent writes within this agent process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_error(c: &mut Conn, what: &str, path: &Path, e: &io::Error) -> io::Result<()> {
    c.send_error(
        ErrorCode::IO,
        e.raw_os_error().unwrap_or(0),
        format!("{what} {}: {e}", path.display()),
    )
}

/// Receives `len` bytes and puts them at `path` atomically with permission bits `mode`.
/// `Err` only when the connection is unusable.
pub fn write(c: &mut Conn, path: &[u8], mode: u32, len: u64) -> io::Result<()> {
    let path = Path::new(OsStr::from_bytes(path));
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => {
            // Still take the announced bytes off the stream, then answer.
            if let DataEnd::Aborted = c.recv_data(len, |_| {})? {
                return Ok(());
            }
            return c.send_error(
                ErrorCode::INVALID_ARGUMENT,
                libc::EISDIR,
                format!("{} does not name a file", path.display()),
            );
        }
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".smolvm-tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| ("creating a temporary file for", e));
    let end = c.recv_data(len, |b| {
        if let Ok(f) = &mut file {
            if let Err(e) = f.write_all(b) {
                file = Err(("writing", e));
            }
        }
    })?;
    let result = file.and_then(|f| {
        if let DataEnd::Aborted = end {
            return Ok(());
        }
        // Explicit, so the umask does not change the requested mode.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| ("setting the mode of", e))?;
        f.sync_all().map_err(|e| ("syncing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| ("renaming into place", e))?;
        // Make the rename itself durable; failure here leaves a correct file, so ignore it.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    });
    match (result, end) {
        (Ok(()), DataEnd::Complete) => c.send(&Response::FileWritten { len }),
        (Ok(()), DataEnd::Aborted) => {
            let _ = std::fs::remove_file(&tmp);
            Ok(())
        }
        (Err((what, e)), end) => {
            let _ = std::fs::remove_file(&tmp);
            match end {
                DataEnd::Complete => io_error(c, what, path, &e),
                DataEnd::Aborted => Ok(()),
            }
        }
    }
}

/// Sends the regular file at `path` in chunks. `Err` only when the connection is unusable.
pub fn read(c: &mut Conn, path: &[u8]) -> io::Result<()> {
    let path = Path::new(OsStr::from_bytes(path));
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return io_error(c, "opening", path, &e),
    };
    let meta = match f.metadata() {
        Ok(m) => m,
        Err(e) => return io_error(c, "reading the metadata of", path, &e),
    };
    if !meta.is_file() {
        // Devices and pipes have no size and may never end.
        return c.send_error(
            ErrorCode::INVALID_ARGUMENT,
            if meta.is_dir() {
                libc::EISDIR
            } else {
                libc::EINVAL
            },
            format!("{} is not a regular file", path.display()),
        );
    }
    let len = meta.len();
    if len > MAX_FILE_SIZE {
        return c.send_error(
            ErrorCode::TOO_LARGE,
            libc::EFBIG,
            format!(
                "{} is {len} bytes, over the limit of {MAX_FILE_SIZE}; compress or split it in the guest",
                path.display()
            ),
        );
    }
    c.queue(&Response::FileStart {
        len,
        mode: meta.mode() & 0o7777,
    });
    let mut buf = vec![0u8; MAX_CHUNK.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        let want = (left as usize).min(buf.len());
        match f.read(&mut buf[..want]) {
            Ok(0) => {
                c.flush()?;
                return c.send_error(
                    ErrorCode::IO,
                    0,
                    format!("{} shrank while it was being read", path.display()),
                );
            }
            Ok(n) => {
                c.queue_data(kind::FILE_DATA, &buf[..n]);
                left -= n as u64;
                c.maybe_flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                c.flush()?;
                return io_error(c, "reading", path, &e);
            }
        }
    }
    c.queue(&Response::FileEnd);
    c.flush()
}

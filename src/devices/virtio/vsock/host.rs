//! The in-process host API: talk to guest vsock ports without a socket file.
//!
//! [`VsockHost`] is a cheap handle (clone it freely, send it to other threads) obtained from
//! [`Vsock::host`](super::Vsock::host) before the device is handed to the transport. Each
//! connection is one end of a `socketpair(2)`; the muxer (on the device thread) holds the other
//! end and treats it exactly like a connection accepted on the Unix listener, so data, credit,
//! half-close and resets behave the same for both.
//!
//! Requests reach the device thread through a bounded channel (at most
//! [`MAX_PENDING_REQUESTS`]) and an eventfd in the muxer's epoll; listeners are a shared map the
//! muxer consults when the guest connects to the host (they take precedence over `<path>_P`).
//!
//! # Example
//! ```no_run
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
//!
//! let vsock = Vsock::new(VsockConfig::new(3))?;
//! let host = vsock.host();
//! // ... hand `vsock` to the VM; once the guest listens on port 52:
//! let mut s = host.connect(52, Duration::from_secs(5))?;
//! s.write_all(b"ping")?;
//! // Guest-initiated connections to CID 2 port 9000:
//! let listener = host.listen(9000)?;
//! let (mut conn, guest_port) = listener.accept()?;
//! # let _ = (guest_port, conn.read(&mut [0u8; 4]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Connect requests queued for the device thread at most; more fail with `WouldBlock`.
pub const MAX_PENDING_REQUESTS: usize = 64;
/// Guest-initiated connections waiting in a [`VsockListener`] at most; more are reset.
pub const ACCEPT_BACKLOG: usize = 128;

/// A request from the API to the muxer.
pub(crate) enum HostRequest {
    /// Connect to guest `port` over `stream` (the muxer's end); answer on `reply`.
    Connect {
        port: u32,
        stream: UnixStream,
        reply: SyncSender<Result<(), io::ErrorKind>>,
    },
}

/// Where guest-initiated connections to a port go.
pub(crate) type ListenerMap = HashMap<u32, SyncSender<(UnixStream, u32)>>;

/// What the API handles and the muxer share.
pub(crate) struct HostShared {
    pub requests: SyncSender<HostRequest>,
    /// Signalled after each request; watched by the muxer's epoll.
    pub wake: EventFd,
    pub listeners: Mutex<ListenerMap>,
}

impl HostShared {
    /// The shared state and the muxer's end of the request channel.
    pub fn new() -> io::Result<(Arc<HostShared>, Receiver<HostRequest>)> {
        let (tx, rx) = mpsc::sync_channel(MAX_PENDING_REQUESTS);
        let shared = HostShared {
            requests: tx,
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            listeners: Mutex::new(HashMap::new()),
        };
        Ok((Arc::new(shared), rx))
    }

    pub fn listeners(&self) -> std::sync::MutexGuard<'_, ListenerMap> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-process side of a [`Vsock`](super::Vsock) device (see the
/// [module documentation](self)). `Clone + Send + Sync`; stays usable after the device moved
/// into its transport.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
/// let vsock = Vsock::new(VsockConfig::new(3))?;
/// let host = vsock.host();
/// let listener = host.listen(1234)?;
/// assert_eq!(listener.port(), 1234);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct VsockHost {
    shared: Arc<HostShared>,
}

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHost").finish_non_exhaustive()
    }
}

impl VsockHost {
    pub(crate) fn new(shared: Arc<HostShared>) -> VsockHost {
        VsockHost { shared }
    }

    /// Connects to guest `port`: sends the guest a REQUEST and returns once it answered.
    ///
    /// The returned stream is blocking; reading it yields what the guest sends, end-of-file
    /// after the guest shut down its sending side; `shutdown(Write)` becomes a vsock SHUTDOWN.
    ///
    /// # Errors
    /// - `ConnectionRefused`: the guest answered RST (nobody listens on `port`).
    /// - `TimedOut`: no answer within `timeout` (the guest driver may not be up yet); the
    ///   attempt is abandoned and the guest gets a RST if it answers later.
    /// - `WouldBlock`: [`MAX_PENDING_REQUESTS`] requests are already queued.
    /// - `ConnectionAborted`: the device is at its connection limit.
    /// - `ConnectionReset`: the device was reset or dropped before the guest answered.
    /// - `NotConnected`: the device no longer exists.
    ///
    /// # Example
    /// ```
    /// use std::time::Duration;
    /// use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
    /// let vsock = Vsock::new(VsockConfig::new(3))?;
    /// // No guest driver: nobody answers.
    /// let err = vsock.host().connect(52, Duration::from_millis(10)).unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        let (reply, answer) = mpsc::sync_channel(1);
        let req = HostRequest::Connect {
            port,
            stream: theirs,
            reply,
        };
        match self.shared.requests.try_send(req) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                    "{MAX_PENDING_REQUESTS} vsock connect requests already pending; retry later"
                ),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the vsock device no longer exists",
                ))
            }
        }
        self.shared.wake.write(1)?;
        match answer.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(ours),
            Ok(Err(kind)) => {
                Err(io::Error::new(
                    kind,
                    match kind {
                        io::ErrorKind::ConnectionRefused => {
                            format!("guest refused the connection to vsock port {port} (nobody listens)")
                        }
                        io::ErrorKind::ConnectionAborted => {
                            "the vsock device is at its connection limit".to_string()
                        }
                        _ => format!("connection to guest vsock port {port} failed"),
                    },
                ))
            }
            Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "guest did not answer a connection to vsock port {port} within {timeout:?} \
                     (is its vsock driver up?)"
                ),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the vsock device was reset before the guest answered",
            )),
        }
    }

    /// Accepts guest-initiated connections to host (CID 2) `port`, in preference to a
    /// `<uds_path>_<port>` socket. The listener stops when dropped.
    ///
    /// # Errors
    /// `AddrInUse` when another [`VsockListener`] has `port`.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
    /// let host = Vsock::new(VsockConfig::new(3))?.host();
    /// let l = host.listen(80)?;
    /// assert_eq!(host.listen(80).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    /// drop(l);
    /// assert!(host.listen(80).is_ok());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn listen(&self, port: u32) -> io::Result<VsockListener> {
        let mut map = self.shared.listeners();
        if map.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("vsock host port {port} already has a listener; drop it first"),
            ));
        }
        let (tx, rx) = mpsc::sync_channel(ACCEPT_BACKLOG);
        map.insert(port, tx);
        Ok(VsockListener {
            port,
            rx,
            shared: self.shared.clone(),
        })
    }
}

/// Guest-initiated connections to one host port ([`VsockHost::listen`]).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
/// let host = Vsock::new(VsockConfig::new(3))?.host();
/// let l = host.listen(7)?;
/// let err = l.accept_timeout(Duration::from_millis(1)).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VsockListener {
    port: u32,
    rx: Receiver<(UnixStream, u32)>,
    shared: Arc<HostShared>,
}

impl std::fmt::Debug for VsockListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockListener")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl VsockListener {
    /// The host port listened on.
    ///
    /// # Example
    /// See [`VsockHost`].
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next guest connection: the stream (blocking) and the guest's port.
    ///
    /// # Errors
    /// `NotConnected` when the device was dropped.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn accept(&self) -> io::Result<(UnixStream, u32)> {
        self.rx.recv().map_err(|_| gone())
    }

    /// Like [`accept`](Self::accept), giving up after `timeout`.
    ///
    /// # Errors
    /// `TimedOut`, or `NotConnected` when the device was dropped.
    ///
    /// # Example
    /// See [`VsockListener`].
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<(UnixStream, u32)> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no guest connection to vsock port {} within {timeout:?}",
                    self.port
                ),
            ),
            RecvTimeoutError::Disconnected => gone(),
        })
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the vsock device no longer exists",
    )
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        self.shared.listeners().remove(&self.port);
    }
}

//! What the virtio-net device reads frames from and writes frames to: [`NetBackend`], with
//! [`TxFrame`] (a frame still in guest memory) and [`MemBackend`] (in memory, for tests,
//! documentation and fuzzing). The TAP backend is [`Tap`](super::Tap).

use std::collections::VecDeque;
use std::io;

use vm_memory::VolatileSlice;

use super::VNET_HDR_LEN;

/// A frame the guest transmits, as the device hands it to [`NetBackend::write_frame`]: a
/// validated copy of its `virtio_net_hdr_v1`, then the frame bytes, usually still in guest
/// memory (one [`VolatileSlice`] per descriptor piece) so a backend can `writev` them without
/// a copy.
///
/// The header is the device's own copy, checked before the frame was accepted: the guest
/// cannot change it between validation and the write. The frame bytes may change under the
/// backend (the guest owns that memory); that only garbles the guest's own frame.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::TxFrame;
/// use vm_memory::VolatileSlice;
/// let hdr = [0u8; 12];
/// let mut a = *b"\x02\x00\x00\x00\x00\x01";
/// let mut b = *b"rest of frame";
/// let segs = [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..])];
/// let f = TxFrame::new(&hdr, &segs);
/// assert_eq!(f.frame_len(), 19);
/// assert_eq!(&f.to_vec()[12..], b"\x02\x00\x00\x00\x00\x01rest of frame");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TxFrame<'a> {
    header: &'a [u8; VNET_HDR_LEN],
    segments: &'a [VolatileSlice<'a>],
}

impl<'a> TxFrame<'a> {
    /// A frame made of `header` and the frame bytes in `segments`, in order.
    ///
    /// # Example
    /// See [`TxFrame`].
    pub fn new(header: &'a [u8; VNET_HDR_LEN], segments: &'a [VolatileSlice<'a>]) -> Self {
        TxFrame { header, segments }
    }

    /// The `virtio_net_hdr_v1`.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::TxFrame;
    /// let hdr = [1u8; 12];
    /// assert_eq!(TxFrame::new(&hdr, &[]).header(), &[1u8; 12]);
    /// ```
    pub fn header(&self) -> &[u8; VNET_HDR_LEN] {
        self.header
    }

    /// The frame bytes, piece by piece.
    ///
    /// # Example
    /// ```
    /// # use smolvm::devices::virtio::net::TxFrame;
    /// assert!(TxFrame::new(&[0; 12], &[]).segments().is_empty());
    /// ```
    pub fn segments(&self) -> &[VolatileSlice<'a>] {
        self.segments
    }

    /// Bytes of the frame (without the header).
    ///
    /// # Example
    /// See [`TxFrame`].
    pub fn frame_len(&self) -> usize {
        self.segments.iter().map(|s| s.len()).sum()
    }

    /// Header and frame copied into one buffer (for backends that cannot scatter-gather).
    ///
    /// # Example
    /// See [`TxFrame`].
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(VNET_HDR_LEN + self.frame_len());
        v.extend_from_slice(self.header);
        for s in self.segments {
            let start = v.len();
            v.resize(start + s.len(), 0);
            s.copy_to(&mut v[start..]);
        }
        v
    }
}

/// A host-side network endpoint for [`Net`](super::Net): it carries whole frames, each
/// preceded by a 12-byte `virtio_net_hdr_v1` ([`VNET_HDR_LEN`]), in both directions.
///
/// Calls never block: an endpoint with nothing to read, or no room to write, answers
/// [`io::ErrorKind::WouldBlock`] and (if it has a [`fd`](Self::fd)) becomes readable /
/// writable later, which the device event loop reports.
///
/// # Example
/// ```
/// use std::io;
/// use smolvm::devices::virtio::net::{NetBackend, TxFrame};
///
/// /// Swallows everything, produces nothing.
/// struct Sink;
/// impl NetBackend for Sink {
///     fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
///         Err(io::ErrorKind::WouldBlock.into())
///     }
///     fn write_frame(&mut self, _frame: &TxFrame<'_>) -> io::Result<()> { Ok(()) }
///     fn fd(&self) -> Option<std::os::raw::c_int> { None }
///     fn set_offloads(&mut self, _guest_features: u64) -> io::Result<()> { Ok(()) }
/// }
/// assert!(Sink.read_frame(&mut [0; 64]).is_err());
/// ```
pub trait NetBackend: Send {
    /// Reads one frame, header included, into `buf` ([`RX_BUFFER_LEN`](super::RX_BUFFER_LEN)
    /// bytes). Returns its length; a frame longer than `buf` may be truncated.
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting; anything else is a backend
    /// failure (counted, and the device stops reading until the next readiness report).
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame (header, then frame bytes).
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when the backend is full (the device retries when it
    /// becomes writable); anything else drops the frame (counted).
    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<()>;

    /// The descriptor the device event loop watches (readable: frames to receive; writable:
    /// room after a [`WouldBlock`](io::ErrorKind::WouldBlock) write). `None` for backends
    /// driven by hand.
    fn fd(&self) -> Option<std::os::raw::c_int>;

    /// Called at activation with the features the driver accepted: enable the receive
    /// offloads it can take (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_UFO`), so the backend never
    /// hands the guest a frame it cannot parse.
    ///
    /// # Errors
    /// The backend cannot be configured; the device then refuses to start.
    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()>;
}

impl<B: NetBackend + ?Sized> NetBackend for Box<B> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_frame(buf)
    }
    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        (**self).write_frame(frame)
    }
    fn fd(&self) -> Option<std::os::raw::c_int> {
        (**self).fd()
    }
    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        (**self).set_offloads(guest_features)
    }
}

/// An in-memory [`NetBackend`]: frames pushed into [`rx`](Self::rx) are received by the
/// guest, frames the guest sends land in [`tx`](Self::tx). For tests, examples and fuzzing;
/// it has no descriptor, so drive the device by hand
/// ([`Net::backend_mut`](super::Net::backend_mut) then a host event or queue notification).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::net::{MemBackend, NetBackend};
/// let mut b = MemBackend::default();
/// b.rx.push_back(vec![7; 20]);
/// let mut buf = [0u8; 64];
/// assert_eq!(b.read_frame(&mut buf).unwrap(), 20);
/// assert!(b.read_frame(&mut buf).is_err()); // WouldBlock
/// assert_eq!(b.reads, 2);
/// ```
#[derive(Debug, Default)]
pub struct MemBackend {
    /// Frames (header included) waiting to be received by the guest.
    pub rx: VecDeque<Vec<u8>>,
    /// Frames (header included) the guest transmitted.
    pub tx: Vec<Vec<u8>>,
    /// When `Some(n)`: at most `n` frames fit in `tx`; further writes are `WouldBlock`.
    pub tx_capacity: Option<usize>,
    /// Make every write fail with an I/O error.
    pub fail_writes: bool,
    /// The features last passed to [`set_offloads`](NetBackend::set_offloads).
    pub offloads: Option<u64>,
    /// Calls to [`read_frame`](NetBackend::read_frame) so far (to check for polling).
    pub reads: u64,
}

impl NetBackend for MemBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        let frame = self.rx.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        if self.fail_writes {
            return Err(io::Error::other("injected write failure"));
        }
        if self.tx_capacity.is_some_and(|c| self.tx.len() >= c) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.tx.push(frame.to_vec());
        Ok(())
    }

    fn fd(&self) -> Option<std::os::raw::c_int> {
        None
    }

    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        self.offloads = Some(guest_features);
        Ok(())
    }
}

//! The split virtqueue (virtio 1.2, section 2.7), device side.
//!
//! A split virtqueue is three areas of guest memory that the driver allocates and hands to
//! the device through the transport:
//!
//! | area | size (bytes) | align | written by |
//! |---|---|---|---|
//! | descriptor table: `{ addr: u64, len: u32, flags: u16, next: u16 }` × size | 16 × size | 16 | driver |
//! | available ring: `flags: u16, idx: u16, ring: [u16; size], used_event: u16` | 6 + 2 × size | 2 | driver |
//! | used ring: `flags: u16, idx: u16, ring: [{ id: u32, len: u32 }; size], avail_event: u16` | 6 + 8 × size | 4 | device |
//!
//! The driver chains descriptors (`VIRTQ_DESC_F_NEXT`), optionally through one indirect
//! table (`VIRTQ_DESC_F_INDIRECT`), puts the head index in the available ring and bumps
//! `avail.idx`; the device [`pop`](Queue::pop)s the chain, uses its buffers and returns it with
//! [`add_used`](Queue::add_used). All fields are little-endian.
//!
//! Everything in guest memory is untrusted. [`Queue::pop`] validates a whole chain before the
//! device sees it: indices in range, no loops (a chain may not be longer than the queue size),
//! at most one level of indirection, every buffer inside guest memory (computed without
//! overflow), device-readable buffers before device-writable ones. A malformed chain is a
//! [`QueueError`] naming its head, and is consumed so that later chains still work. Memory is
//! only accessed through vm-memory's checked, volatile [`Bytes`] API.
//!
//! Zero-length buffers are accepted (the specification does not forbid them and they cannot
//! reach memory): they keep their place in the chain, their address is not checked, and the
//! copy helpers skip them. Zero-length *indirect tables* are rejected.
//!
//! # Example
//! A driver (simulated here) posts a two-descriptor chain; the device reads the request,
//! writes the reply and returns the chain.
//! ```
//! use smolvm::devices::virtio::queue::{Queue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = smolvm::memory::create(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let mut q = Queue::new(16);
//! q.size = 4;
//! q.desc_table = GuestAddress(0x1000);
//! q.avail_ring = GuestAddress(0x2000);
//! q.used_ring = GuestAddress(0x3000);
//! q.ready = true;
//! assert!(q.is_valid(&mem));
//!
//! // Driver: descriptor 0 = 5 readable bytes at 0x4000 -> descriptor 1 = 8 writable bytes.
//! let desc = |addr: u64, len: u32, flags: u16, next: u16| {
//!     let mut d = [0u8; 16];
//!     d[..8].copy_from_slice(&addr.to_le_bytes());
//!     d[8..12].copy_from_slice(&len.to_le_bytes());
//!     d[12..14].copy_from_slice(&flags.to_le_bytes());
//!     d[14..].copy_from_slice(&next.to_le_bytes());
//!     d
//! };
//! mem.write_slice(&desc(0x4000, 5, VIRTQ_DESC_F_NEXT, 1), GuestAddress(0x1000)).unwrap();
//! mem.write_slice(&desc(0x5000, 8, VIRTQ_DESC_F_WRITE, 0), GuestAddress(0x1010)).unwrap();
//! mem.write_slice(b"hello", GuestAddress(0x4000)).unwrap();
//! mem.write_obj(0u16.to_le(), GuestAddress(0x2004)).unwrap(); // avail.ring[0] = head 0
//! mem.write_obj(1u16.to_le(), GuestAddress(0x2002)).unwrap(); // avail.idx = 1
//!
//! // Device:
//! let chain = q.pop(&mem).unwrap().expect("one chain available");
//! let mut req = [0u8; 5];
//! chain.read_exact_at(&mem, 0, &mut req).unwrap();
//! assert_eq!(&req, b"hello");
//! let written = chain.write_at(&mem, 0, b"world!").unwrap();
//! q.add_used(&mem, chain.head_index(), written as u32).unwrap();
//! assert!(q.pop(&mem).unwrap().is_none());
//! assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1); // used.idx
//! ```

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Descriptor flag: the buffer continues in the descriptor named by `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (needs
/// [`VIRTIO_F_RING_INDIRECT_DESC`](super::VIRTIO_F_RING_INDIRECT_DESC)).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available-ring flag: the driver asks not to be interrupted (ignored with EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device asks not to be notified (ignored with EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// The largest queue size the split layout allows (2^15).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Descriptors a [`DescriptorChain`] holds without a heap allocation.
const INLINE_DESCRIPTORS: usize = 8;
/// Bytes in one descriptor-table entry.
const DESC_SIZE: u64 = 16;

/// Errors from a [`Queue`] or a [`DescriptorChain`]. Each variant says what the device should do.
///
/// Chain errors ([`QueueError::chain_head`] is `Some`) consume the chain: complete it with
/// [`Queue::add_used`] (length 0, or after writing an error status where the device protocol
/// allows it) and carry on with the next one.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::QueueError;
/// let e = QueueError::DescriptorLoop { head: 3, limit: 256 };
/// assert_eq!(e.chain_head(), Some(3));
/// assert!(e.to_string().contains("head 3"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is not ready, or its size is zero, not a power of two or above its maximum.
    /// Device: ignore the notification (the driver has not finished setting the queue up).
    #[error("virtqueue is not ready or has an invalid size ({size}, max {max_size})")]
    NotReady {
        /// Configured size.
        size: u16,
        /// Device maximum.
        max_size: u16,
    },
    /// A ring field could not be read or written (the ring is outside guest memory: the queue
    /// was made ready without passing [`Queue::is_valid`]). Device: set DEVICE_NEEDS_RESET.
    #[error("cannot access virtqueue ring at {addr:#x}: {source}")]
    RingAccess {
        /// Guest address of the field.
        addr: u64,
        /// Underlying error.
        #[source]
        source: GuestMemoryError,
    },
    /// `avail.idx` claims more new chains than the queue holds: the driver is broken or
    /// hostile. Nothing was consumed. Device: set DEVICE_NEEDS_RESET and stop using the queue.
    #[error(
        "avail.idx {avail_idx} is more than {size} ahead of the device's next index {next_avail}"
    )]
    AvailIndexJump {
        /// The driver's `avail.idx`.
        avail_idx: u16,
        /// The next entry the device would have read.
        next_avail: u16,
        /// The queue size.
        size: u16,
    },
    /// An available-ring entry names a head descriptor outside the table. The entry was
    /// consumed, but there is no valid head to return. Device: set DEVICE_NEEDS_RESET (or
    /// skip the entry).
    #[error("available ring names head descriptor {head}, but the queue has {size}")]
    HeadOutOfRange {
        /// The index found in the ring.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` is outside its table. Device: complete the chain (length 0).
    #[error("chain with head {head}: descriptor {index} links to {next}, outside its table of {table_len}")]
    NextOutOfRange {
        /// Head of the chain.
        head: u16,
        /// The descriptor with the bad link (index in its table).
        index: u16,
        /// The bad link.
        next: u16,
        /// Entries in the table (direct or indirect).
        table_len: u32,
    },
    /// The chain has more descriptors than the queue size: a `next` loop, or a driver breaking
    /// the specification's length limit. Device: complete the chain (length 0).
    #[error("chain with head {head} is longer than {limit} descriptors (a descriptor loop?)")]
    DescriptorLoop {
        /// Head of the chain.
        head: u16,
        /// The limit (the queue size).
        limit: u16,
    },
    /// `VIRTQ_DESC_F_INDIRECT` without the feature negotiated. Device: complete the chain.
    #[error("chain with head {head}: descriptor {index} is indirect, but VIRTIO_F_RING_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// Head of the chain.
        head: u16,
        /// The indirect descriptor.
        index: u16,
    },
    /// `VIRTQ_DESC_F_INDIRECT` inside an indirect table. Device: complete the chain.
    #[error("chain with head {head}: indirect descriptor {index} inside an indirect table")]
    NestedIndirect {
        /// Head of the chain.
        head: u16,
        /// Index of the offending descriptor in the indirect table.
        index: u16,
    },
    /// `VIRTQ_DESC_F_INDIRECT` together with `VIRTQ_DESC_F_NEXT`. Device: complete the chain.
    #[error("chain with head {head}: descriptor {index} has both INDIRECT and NEXT")]
    IndirectWithNext {
        /// Head of the chain.
        head: u16,
        /// The offending descriptor.
        index: u16,
    },
    /// An indirect table whose length is zero, not a multiple of 16, or more entries than the
    /// queue size. Device: complete the chain.
    #[error("chain with head {head}: indirect table length {len} is not a multiple of 16 between 16 and 16 x {size}")]
    IndirectTableLength {
        /// Head of the chain.
        head: u16,
        /// The table length in bytes.
        len: u32,
        /// The queue size.
        size: u16,
    },
    /// A buffer or an indirect table is (partly) outside guest memory, or `addr + len`
    /// overflows. Device: complete the chain (length 0).
    #[error("chain with head {head}: buffer [{addr:#x}, +{len:#x}) is outside guest memory")]
    BufferOutOfRange {
        /// Head of the chain.
        head: u16,
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one (the specification requires
    /// all readable buffers first). Device: complete the chain.
    #[error("chain with head {head}: readable descriptor {index} after a writable one")]
    ReadableAfterWritable {
        /// Head of the chain.
        head: u16,
        /// The readable descriptor (index in its table).
        index: u16,
    },
    /// [`Queue::add_used`] with a head index outside the queue: a device bug.
    #[error("cannot return head {head} to a queue of size {size}")]
    UsedHeadOutOfRange {
        /// The index passed.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// [`DescriptorChain::read_exact_at`] / [`DescriptorChain::write_all_at`]: the chain's
    /// readable / writable part is too short. Device: fail the request (bad request format).
    #[error("chain with head {head}: needs {needed} bytes at offset {offset}, has {available}")]
    ChainTooShort {
        /// Head of the chain.
        head: u16,
        /// Offset of the access.
        offset: u64,
        /// Bytes needed.
        needed: usize,
        /// Bytes of the relevant part of the chain.
        available: u64,
    },
    /// Copying to or from a buffer failed after validation (guest memory changed under the
    /// device). Device: complete the chain with an I/O error.
    #[error("chain with head {head}: guest memory access at {addr:#x} failed: {source}")]
    Memory {
        /// Head of the chain.
        head: u16,
        /// Guest address of the access.
        addr: u64,
        /// Underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

impl QueueError {
    /// The head of the chain this error consumed, which the device should still return with
    /// [`Queue::add_used`]; `None` for queue-level errors.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::QueueError;
    /// assert_eq!(QueueError::HeadOutOfRange { head: 9, size: 8 }.chain_head(), None);
    /// assert_eq!(QueueError::NestedIndirect { head: 2, index: 0 }.chain_head(), Some(2));
    /// ```
    pub fn chain_head(&self) -> Option<u16> {
        match *self {
            QueueError::NotReady { .. }
            | QueueError::RingAccess { .. }
            | QueueError::AvailIndexJump { .. }
            | QueueError::HeadOutOfRange { .. }
            | QueueError::UsedHeadOutOfRange { .. } => None,
            QueueError::NextOutOfRange { head, .. }
            | QueueError::DescriptorLoop { head, .. }
            | QueueError::IndirectNotNegotiated { head, .. }
            | QueueError::NestedIndirect { head, .. }
            | QueueError::IndirectWithNext { head, .. }
            | QueueError::IndirectTableLength { head, .. }
            | QueueError::BufferOutOfRange { head, .. }
            | QueueError::ReadableAfterWritable { head, .. }
            | QueueError::ChainTooShort { head, .. }
            | QueueError::Memory { head, .. } => Some(head),
        }
    }
}

/// One validated buffer of a [`DescriptorChain`]: `[addr, addr + len)` lies inside guest
/// memory (unless `len` is 0).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::Descriptor;
/// use vm_memory::GuestAddress;
/// let d = Descriptor { addr: GuestAddress(0x1000), len: 512, writable: true };
/// assert!(d.writable && d.len == 512);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`); otherwise device-readable.
    pub writable: bool,
}

const EMPTY_DESCRIPTOR: Descriptor = Descriptor {
    addr: GuestAddress(0),
    len: 0,
    writable: false,
};

/// A validated descriptor chain taken from a [`Queue`]: its device-readable buffers, then its
/// device-writable ones, with copy helpers that work across buffer boundaries.
///
/// Chains of up to 8 buffers are stored inline (no heap allocation per request).
///
/// # Example
/// See the [module example](self) for a chain popped from a queue; chains can also be built
/// directly, for tests of device code:
/// ```
/// use smolvm::devices::virtio::{Descriptor, DescriptorChain};
/// use vm_memory::{Bytes, GuestAddress};
/// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let chain = DescriptorChain::from_descriptors(
///     0,
///     &[
///         Descriptor { addr: GuestAddress(0x100), len: 2, writable: false },
///         Descriptor { addr: GuestAddress(0x200), len: 2, writable: false },
///         Descriptor { addr: GuestAddress(0x300), len: 4, writable: true },
///     ],
/// )
/// .unwrap();
/// mem.write_slice(b"ab", GuestAddress(0x100)).unwrap();
/// mem.write_slice(b"cd", GuestAddress(0x200)).unwrap();
/// let mut buf = [0u8; 3];
/// assert_eq!(chain.read_at(&mem, 1, &mut buf).unwrap(), 3); // across the boundary
/// assert_eq!(&buf, b"bcd");
/// assert_eq!((chain.readable_len(), chain.writable_len()), (4, 4));
/// ```
#[derive(Debug, Clone)]
pub struct DescriptorChain {
    head: u16,
    inline: [Descriptor; INLINE_DESCRIPTORS],
    inline_len: usize,
    /// Holds all descriptors once the chain outgrows `inline` (empty otherwise: no allocation).
    spill: Vec<Descriptor>,
    readable_count: usize,
    readable_len: u64,
    writable_len: u64,
}

impl DescriptorChain {
    fn new(head: u16) -> Self {
        DescriptorChain {
            head,
            inline: [EMPTY_DESCRIPTOR; INLINE_DESCRIPTORS],
            inline_len: 0,
            spill: Vec::new(),
            readable_count: 0,
            readable_len: 0,
            writable_len: 0,
        }
    }

    /// Builds a chain from already-validated buffers (for device tests and synthetic requests).
    /// Returns `None` if a readable buffer follows a writable one. Addresses are not checked
    /// here; the copy helpers still go through checked guest-memory accesses.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::{Descriptor, DescriptorChain};
    /// use vm_memory::GuestAddress;
    /// let w = Descriptor { addr: GuestAddress(0), len: 1, writable: true };
    /// let r = Descriptor { addr: GuestAddress(0), len: 1, writable: false };
    /// assert!(DescriptorChain::from_descriptors(0, &[r, w]).is_some());
    /// assert!(DescriptorChain::from_descriptors(0, &[w, r]).is_none());
    /// ```
    pub fn from_descriptors(head: u16, descriptors: &[Descriptor]) -> Option<Self> {
        let mut chain = DescriptorChain::new(head);
        for d in descriptors {
            if !d.writable && chain.writable_count() > 0 {
                return None;
            }
            chain.push(*d);
        }
        Some(chain)
    }

    fn push(&mut self, d: Descriptor) {
        if self.inline_len < INLINE_DESCRIPTORS {
            self.inline[self.inline_len] = d;
            self.inline_len += 1;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(d);
        }
        if d.writable {
            self.writable_len += u64::from(d.len);
        } else {
            self.readable_count += 1;
            self.readable_len += u64::from(d.len);
        }
    }

    fn writable_count(&self) -> usize {
        self.descriptors().len() - self.readable_count
    }

    /// The head descriptor index: what [`Queue::add_used`] takes to return the chain.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::DescriptorChain;
    /// assert_eq!(DescriptorChain::from_descriptors(7, &[]).unwrap().head_index(), 7);
    /// ```
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// All buffers, readable ones first.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::{Descriptor, DescriptorChain};
    /// use vm_memory::GuestAddress;
    /// let d = Descriptor { addr: GuestAddress(0x10), len: 4, writable: false };
    /// assert_eq!(DescriptorChain::from_descriptors(0, &[d]).unwrap().descriptors(), &[d]);
    /// ```
    pub fn descriptors(&self) -> &[Descriptor] {
        if self.spill.is_empty() {
            &self.inline[..self.inline_len]
        } else {
            &self.spill
        }
    }

    /// The device-readable buffers (the request), in chain order.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::{Descriptor, DescriptorChain};
    /// use vm_memory::GuestAddress;
    /// let r = Descriptor { addr: GuestAddress(0x10), len: 4, writable: false };
    /// let w = Descriptor { addr: GuestAddress(0x20), len: 1, writable: true };
    /// let c = DescriptorChain::from_descriptors(0, &[r, w]).unwrap();
    /// assert_eq!((c.readable(), c.writable()), (&[r][..], &[w][..]));
    /// ```
    pub fn readable(&self) -> &[Descriptor] {
        &self.descriptors()[..self.readable_count]
    }

    /// The device-writable buffers (the reply), in chain order.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::DescriptorChain;
    /// assert!(DescriptorChain::from_descriptors(0, &[]).unwrap().writable().is_empty());
    /// ```
    pub fn writable(&self) -> &[Descriptor] {
        &self.descriptors()[self.readable_count..]
    }

    /// Total bytes of the readable buffers.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::DescriptorChain;
    /// assert_eq!(DescriptorChain::from_descriptors(0, &[]).unwrap().readable_len(), 0);
    /// ```
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total bytes of the writable buffers.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::DescriptorChain;
    /// assert_eq!(DescriptorChain::from_descriptors(0, &[]).unwrap().writable_len(), 0);
    /// ```
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Copies readable bytes starting `offset` bytes into the readable part into `buf`, across
    /// buffer boundaries. Returns the bytes copied: less than `buf.len()` only where the
    /// readable part ends (0 at or past its end).
    ///
    /// # Example
    /// See [`DescriptorChain`].
    pub fn read_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        self.for_each_span(self.readable(), offset, buf.len(), |addr, pos, n| {
            mem.read_slice(&mut buf[pos..pos + n], addr)
                .map_err(|source| QueueError::Memory {
                    head: self.head,
                    addr: addr.0,
                    source,
                })?;
            done = pos + n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Like [`read_at`](Self::read_at), but fails with [`QueueError::ChainTooShort`] unless
    /// `buf` is filled completely.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn read_exact_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), QueueError> {
        self.check_room(offset, buf.len(), self.readable_len)?;
        self.read_at(mem, offset, buf).map(|_| ())
    }

    /// Copies `buf` into the writable part starting `offset` bytes into it, across buffer
    /// boundaries. Returns the bytes written: less than `buf.len()` only where the writable part
    /// ends. Readable buffers are never written.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::{Descriptor, DescriptorChain};
    /// use vm_memory::{Bytes, GuestAddress};
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let w = |a| Descriptor { addr: GuestAddress(a), len: 2, writable: true };
    /// let chain = DescriptorChain::from_descriptors(0, &[w(0x100), w(0x200)]).unwrap();
    /// assert_eq!(chain.write_at(&mem, 1, b"xyzw").unwrap(), 3); // 1 byte + 2 bytes
    /// assert_eq!(mem.read_obj::<u8>(GuestAddress(0x101)).unwrap(), b'x');
    /// assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(0x200)).unwrap(), *b"yz");
    /// ```
    pub fn write_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        self.for_each_span(self.writable(), offset, buf.len(), |addr, pos, n| {
            mem.write_slice(&buf[pos..pos + n], addr)
                .map_err(|source| QueueError::Memory {
                    head: self.head,
                    addr: addr.0,
                    source,
                })?;
            done = pos + n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Like [`write_at`](Self::write_at), but fails with [`QueueError::ChainTooShort`] (writing
    /// nothing) unless all of `buf` fits.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::{Descriptor, DescriptorChain, QueueError};
    /// use vm_memory::GuestAddress;
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let w = Descriptor { addr: GuestAddress(0x100), len: 1, writable: true };
    /// let chain = DescriptorChain::from_descriptors(0, &[w]).unwrap();
    /// assert!(chain.write_all_at(&mem, 0, &[0]).is_ok());
    /// assert!(matches!(chain.write_all_at(&mem, 0, &[0, 0]), Err(QueueError::ChainTooShort { .. })));
    /// ```
    pub fn write_all_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), QueueError> {
        self.check_room(offset, buf.len(), self.writable_len)?;
        self.write_at(mem, offset, buf).map(|_| ())
    }

    fn check_room(&self, offset: u64, needed: usize, available: u64) -> Result<(), QueueError> {
        let fits = offset
            .checked_add(needed as u64)
            .is_some_and(|end| end <= available);
        if fits {
            Ok(())
        } else {
            Err(QueueError::ChainTooShort {
                head: self.head,
                offset,
                needed,
                available,
            })
        }
    }

    /// Calls `f(guest address, position in the caller's buffer, length)` for each piece of
    /// `[offset, offset + count)` of the byte stream formed by `descs`.
    fn for_each_span(
        &self,
        descs: &[Descriptor],
        mut offset: u64,
        count: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        let mut pos = 0usize;
        for d in descs {
            if pos == count {
                break;
            }
            let len = u64::from(d.len);
            if offset >= len {
                offset -= len;
                continue;
            }
            // `len - offset` ≤ u32::MAX, so it fits in usize on every supported host.
            let n = ((len - offset) as usize).min(count - pos);
            // Cannot overflow for a popped chain ([addr, addr + len) was validated), but
            // `from_descriptors` takes anything.
            let addr = d.addr.0.checked_add(offset).ok_or(QueueError::Memory {
                head: self.head,
                addr: d.addr.0,
                source: GuestMemoryError::InvalidGuestAddress(d.addr),
            })?;
            f(GuestAddress(addr), pos, n)?;
            pos += n;
            offset = 0;
        }
        Ok(())
    }
}

/// One split virtqueue as the driver configured it, plus the device's ring positions: plain
/// data, so a snapshot can save and restore it as is.
///
/// The transport writes `size`, the three ring addresses and `ready` as the driver programs
/// them (and `indirect` / `event_idx` from the negotiated features), checks
/// [`is_valid`](Self::is_valid) when the driver sets the queue ready, and calls
/// [`reset`](Self::reset) on a device reset.
///
/// # Example
/// ```
/// use smolvm::devices::virtio::Queue;
/// let mut q = Queue::new(256);
/// assert_eq!((q.max_size, q.size, q.ready), (256, 256, false));
/// q.size = 128;
/// q.ready = true;
/// q.reset();
/// assert_eq!((q.size, q.ready), (256, false));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// The largest size the device allows (a power of two, at most [`MAX_QUEUE_SIZE`]).
    pub max_size: u16,
    /// Entries in each ring, as the driver set it (a power of two, `1..=max_size`).
    pub size: u16,
    /// The driver enabled the queue (`QueueReady`).
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: GuestAddress,
    /// Guest address of the available (driver) ring.
    pub avail_ring: GuestAddress,
    /// Guest address of the used (device) ring.
    pub used_ring: GuestAddress,
    /// `VIRTIO_F_RING_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub event_idx: bool,
    /// The next available-ring entry the device will read (free-running, wraps at 2^16).
    pub next_avail: u16,
    /// The next used-ring entry the device will write; also the `used.idx` it last published.
    pub next_used: u16,
    /// `next_used` when [`needs_notification`](Self::needs_notification) last ran (EVENT_IDX
    /// bookkeeping); `None` until then, which always notifies.
    pub signalled_used: Option<u16>,
}

impl Queue {
    /// A queue in its reset state: not ready, `size = max_size`, rings at 0.
    ///
    /// `max_size` is the device's choice: a power of two up to [`MAX_QUEUE_SIZE`] (a queue with
    /// another value never passes [`is_valid`](Self::is_valid)).
    ///
    /// # Example
    /// ```
    /// let q = smolvm::devices::virtio::Queue::new(1024);
    /// assert_eq!((q.next_avail, q.next_used), (0, 0));
    /// ```
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            indirect: false,
            event_idx: false,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
        }
    }

    /// Back to the state of [`new`](Self::new) (device reset), keeping `max_size`.
    ///
    /// # Example
    /// See [`Queue`].
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// The size is usable: a power of two in `1..=max_size`, and `max_size ≤ 32768`.
    fn size_ok(&self) -> bool {
        self.size.is_power_of_two()
            && self.size <= self.max_size
            && self.max_size.is_power_of_two()
            && self.max_size <= MAX_QUEUE_SIZE
    }

    /// Whether the configuration can be used: size a power of two in `1..=max_size`, the rings
    /// aligned as the specification requires (descriptor table 16, available ring 2, used ring
    /// 4 bytes) and each ring entirely inside guest memory (event fields included). Does not
    /// look at `ready`.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::Queue;
    /// use vm_memory::GuestAddress;
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x10000)]).unwrap();
    /// let mut q = Queue::new(256);
    /// q.desc_table = GuestAddress(0x0);
    /// q.avail_ring = GuestAddress(0x1000);
    /// q.used_ring = GuestAddress(0x2000);
    /// assert!(q.is_valid(&mem));
    /// q.used_ring = GuestAddress(0xfc00); // 6 + 8 x 256 bytes do not fit below 0x10000
    /// assert!(!q.is_valid(&mem));
    /// ```
    pub fn is_valid<M: GuestMemoryBackend + ?Sized>(&self, mem: &M) -> bool {
        if !self.size_ok() {
            return false;
        }
        let size = u64::from(self.size);
        let area_ok = |addr: GuestAddress, align: u64, len: u64| {
            addr.0 % align == 0
                && addr.0.checked_add(len).is_some()
                && mem.check_range(addr, len as usize)
        };
        area_ok(self.desc_table, 16, DESC_SIZE * size)
            && area_ok(self.avail_ring, 2, 6 + 2 * size)
            && area_ok(self.used_ring, 4, 6 + 8 * size)
    }

    fn check_ready(&self) -> Result<(), QueueError> {
        if self.ready && self.size_ok() {
            Ok(())
        } else {
            Err(QueueError::NotReady {
                size: self.size,
                max_size: self.max_size,
            })
        }
    }

    /// Address of `base + offset`, or a ring-access error when that overflows.
    fn ring_addr(base: GuestAddress, offset: u64) -> Result<GuestAddress, QueueError> {
        base.0
            .checked_add(offset)
            .map(GuestAddress)
            .ok_or(QueueError::RingAccess {
                addr: base.0,
                source: GuestMemoryError::InvalidGuestAddress(base),
            })
    }

    fn load_u16<M: GuestMemoryBackend + ?Sized>(
        mem: &M,
        base: GuestAddress,
        offset: u64,
        order: Ordering,
    ) -> Result<u16, QueueError> {
        let addr = Self::ring_addr(base, offset)?;
        mem.load::<u16>(addr, order)
            .map(u16::from_le)
            .map_err(|source| QueueError::RingAccess {
                addr: addr.0,
                source,
            })
    }

    fn store_u16<M: GuestMemoryBackend + ?Sized>(
        mem: &M,
        base: GuestAddress,
        offset: u64,
        val: u16,
        order: Ordering,
    ) -> Result<(), QueueError> {
        let addr = Self::ring_addr(base, offset)?;
        mem.store(val.to_le(), addr, order)
            .map_err(|source| QueueError::RingAccess {
                addr: addr.0,
                source,
            })
    }

    /// The driver's `avail.idx`, read with Acquire ordering so that ring entries and
    /// descriptors the driver wrote before it are visible.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::Queue;
    /// use vm_memory::{Bytes, GuestAddress};
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let mut q = Queue::new(8);
    /// q.avail_ring = GuestAddress(0x100);
    /// mem.write_obj(5u16.to_le(), GuestAddress(0x102)).unwrap();
    /// assert_eq!(q.avail_idx(&mem).unwrap(), 5);
    /// ```
    pub fn avail_idx<M: GuestMemoryBackend + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        Self::load_u16(mem, self.avail_ring, 2, Ordering::Acquire)
    }

    /// Takes the next available chain, validated. `Ok(None)`: nothing new.
    ///
    /// Errors: [`QueueError::NotReady`], [`QueueError::RingAccess`] and
    /// [`QueueError::AvailIndexJump`] consume nothing; every other error consumes one
    /// available-ring entry (`next_avail` advances), so the device can report it and go on.
    /// Work per call is bounded by the queue size whatever the guest wrote.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn pop<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<DescriptorChain>, QueueError> {
        self.check_ready()?;
        let avail_idx = self.avail_idx(mem)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndexJump {
                avail_idx,
                next_avail: self.next_avail,
                size: self.size,
            });
        }
        // Belt and braces on top of the Acquire load: ring entries and descriptors are read
        // only after avail.idx.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail & (self.size - 1));
        let head = Self::load_u16(mem, self.avail_ring, 4 + 2 * slot, Ordering::Relaxed)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        self.walk_chain(mem, head).map(Some)
    }

    /// Reads and validates the chain starting at `head` (< size).
    fn walk_chain<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        head: u16,
    ) -> Result<DescriptorChain, QueueError> {
        let size = self.size;
        let mut chain = DescriptorChain::new(head);
        let mut table = self.desc_table;
        let mut table_len = u32::from(size);
        let mut in_indirect = false;
        let mut index = head;
        // Each iteration either adds a buffer (at most `size`, then DescriptorLoop) or enters
        // the indirect table (at most once, then NestedIndirect): bounded by size + 1.
        loop {
            let desc_off = u64::from(index) * DESC_SIZE;
            let desc_addr = table.0.wrapping_add(desc_off);
            let mut raw = [0u8; 16];
            // The table was range-checked (is_valid or the indirect checks above), so this only
            // fails for a queue made ready without is_valid().
            table
                .0
                .checked_add(desc_off)
                .ok_or(GuestMemoryError::InvalidGuestAddress(table))
                .and_then(|a| mem.read_slice(&mut raw, GuestAddress(a)))
                .map_err(|_| QueueError::BufferOutOfRange {
                    head,
                    addr: desc_addr,
                    len: DESC_SIZE as u32,
                })?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);

            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated { head, index });
                }
                if in_indirect {
                    return Err(QueueError::NestedIndirect { head, index });
                }
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext { head, index });
                }
                if len == 0 || len % 16 != 0 || len / 16 > u32::from(size) {
                    return Err(QueueError::IndirectTableLength { head, len, size });
                }
                if !Self::range_ok(mem, addr, len) {
                    return Err(QueueError::BufferOutOfRange { head, addr, len });
                }
                table = GuestAddress(addr);
                table_len = len / 16;
                in_indirect = true;
                index = 0;
                continue;
            }

            if chain.descriptors().len() >= usize::from(size) {
                return Err(QueueError::DescriptorLoop { head, limit: size });
            }
            let writable = flags & VIRTQ_DESC_F_WRITE != 0;
            if !writable && chain.writable_count() > 0 {
                return Err(QueueError::ReadableAfterWritable { head, index });
            }
            if len != 0 && !Self::range_ok(mem, addr, len) {
                return Err(QueueError::BufferOutOfRange { head, addr, len });
            }
            chain.push(Descriptor {
                addr: GuestAddress(addr),
                len,
                writable,
            });

            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if u32::from(next) >= table_len {
                return Err(QueueError::NextOutOfRange {
                    head,
                    index,
                    next,
                    table_len,
                });
            }
            index = next;
        }
    }

    /// `[addr, addr + len)` is inside guest memory and does not wrap.
    fn range_ok<M: GuestMemoryBackend + ?Sized>(mem: &M, addr: u64, len: u32) -> bool {
        addr.checked_add(u64::from(len)).is_some()
            && mem.check_range(GuestAddress(addr), len as usize)
    }

    /// Returns a chain to the driver: writes the used element `{ head, len }` (`len` = bytes
    /// the device wrote into the chain), then publishes it by storing `used.idx` with Release
    /// ordering.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn add_used<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.check_ready()?;
        if head >= self.size {
            return Err(QueueError::UsedHeadOutOfRange {
                head,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_used & (self.size - 1));
        let elem_addr = Self::ring_addr(self.used_ring, 4 + 8 * slot)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, elem_addr)
            .map_err(|source| QueueError::RingAccess {
                addr: elem_addr.0,
                source,
            })?;
        let next_used = self.next_used.wrapping_add(1);
        fence(Ordering::Release);
        Self::store_u16(mem, self.used_ring, 2, next_used, Ordering::Release)?;
        self.next_used = next_used;
        Ok(())
    }

    /// Whether the driver wants an interrupt for the chains returned since the last call.
    ///
    /// With EVENT_IDX: the `vring_need_event(used_event, next_used, signalled_used)` rule (the
    /// first call always notifies). Without: unless the driver set
    /// [`VIRTQ_AVAIL_F_NO_INTERRUPT`]. A full fence orders the used-ring writes before the
    /// read of the driver's field. If that field cannot be read, returns `true` (a spurious
    /// interrupt is harmless; a lost one hangs the driver).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::Queue;
    /// use vm_memory::{Bytes, GuestAddress};
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let mut q = Queue::new(8);
    /// q.avail_ring = GuestAddress(0x100);
    /// assert!(q.needs_notification(&mem));
    /// mem.write_obj(1u16.to_le(), GuestAddress(0x100)).unwrap(); // VIRTQ_AVAIL_F_NO_INTERRUPT
    /// assert!(!q.needs_notification(&mem));
    /// ```
    pub fn needs_notification<M: GuestMemoryBackend + ?Sized>(&mut self, mem: &M) -> bool {
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if self.event_idx {
            let old = self.signalled_used.replace(new);
            let used_event_off = 4 + 2 * u64::from(self.size);
            let Ok(used_event) =
                Self::load_u16(mem, self.avail_ring, used_event_off, Ordering::Relaxed)
            else {
                return true;
            };
            match old {
                None => true,
                // vring_need_event(): notify iff used_event lies in [old, new).
                Some(old) => new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old),
            }
        } else {
            match Self::load_u16(mem, self.avail_ring, 0, Ordering::Relaxed) {
                Ok(flags) => flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => true,
            }
        }
    }

    /// Asks the driver to notify the device of new chains: with EVENT_IDX writes
    /// `avail_event = next_avail`, otherwise clears [`VIRTQ_USED_F_NO_NOTIFY`]. Then (full
    /// fence) returns whether chains arrived meanwhile, in which case the device must pop
    /// again instead of waiting for a notification that may never come. Returns `true` when
    /// guest memory cannot be accessed, so the caller's next `pop` reports the error.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::Queue;
    /// use vm_memory::{Bytes, GuestAddress};
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let mut q = Queue::new(8);
    /// (q.avail_ring, q.used_ring, q.event_idx) = (GuestAddress(0x100), GuestAddress(0x200), true);
    /// q.next_avail = 3;
    /// mem.write_obj(3u16.to_le(), GuestAddress(0x102)).unwrap(); // avail.idx: nothing new
    /// assert!(!q.enable_notification(&mem));
    /// assert_eq!(mem.read_obj::<u16>(GuestAddress(0x200 + 4 + 8 * 8)).unwrap(), 3); // avail_event
    /// ```
    pub fn enable_notification<M: GuestMemoryBackend + ?Sized>(&mut self, mem: &M) -> bool {
        let written = if self.event_idx {
            let off = 4 + 8 * u64::from(self.size);
            Self::store_u16(mem, self.used_ring, off, self.next_avail, Ordering::Relaxed)
        } else {
            Self::store_u16(mem, self.used_ring, 0, 0, Ordering::Relaxed)
        };
        if written.is_err() {
            return true;
        }
        fence(Ordering::SeqCst);
        match self.avail_idx(mem) {
            Ok(idx) => idx != self.next_avail,
            Err(_) => true,
        }
    }

    /// Tells the driver not to notify the device (while the device is busy popping): sets
    /// [`VIRTQ_USED_F_NO_NOTIFY`]. With EVENT_IDX nothing is written: the stale `avail_event`
    /// already stops notifications once the driver has passed it.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::Queue;
    /// use vm_memory::{Bytes, GuestAddress};
    /// let mem = smolvm::memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
    /// let mut q = Queue::new(8);
    /// q.used_ring = GuestAddress(0x200);
    /// q.disable_notification(&mem);
    /// assert_eq!(mem.read_obj::<u16>(GuestAddress(0x200)).unwrap(), 1);
    /// ```
    pub fn disable_notification<M: GuestMemoryBackend + ?Sized>(&mut self, mem: &M) {
        if !self.event_idx {
            // Best effort: a failed write only costs a notification.
            let _ = Self::store_u16(
                mem,
                self.used_ring,
                0,
                VIRTQ_USED_F_NO_NOTIFY,
                Ordering::Relaxed,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{self, GuestMemory};

    const MEM_SIZE: usize = 1 << 20;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x3000;
    const USED: u64 = 0x4000;
    const DATA: u64 = 0x10000;

    /// A driver that lays out rings in guest memory the way Linux's virtio_ring does.
    struct Driver {
        mem: GuestMemory,
        size: u16,
        avail_idx: u16,
    }

    impl Driver {
        fn new(size: u16) -> (Driver, Queue) {
            let mem = memory::create(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let mut q = Queue::new(256);
            q.size = size;
            q.desc_table = GuestAddress(DESC);
            q.avail_ring = GuestAddress(AVAIL);
            q.used_ring = GuestAddress(USED);
            q.ready = true;
            assert!(q.is_valid(&mem));
            let d = Driver {
                mem,
                size,
                avail_idx: 0,
            };
            (d, q)
        }

        fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.write_desc(DESC, i, addr, len, flags, next);
        }

        /// Writes a chain of (len, writable) buffers at descriptors first..; data at DATA + 0x1000 × i.
        fn chain(&self, first: u16, bufs: &[(u32, bool)]) {
            for (k, &(len, w)) in bufs.iter().enumerate() {
                let i = first + k as u16;
                let last = k + 1 == bufs.len();
                let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT }
                    | if w { VIRTQ_DESC_F_WRITE } else { 0 };
                self.desc(i, DATA + 0x1000 * u64::from(i), len, flags, i + 1);
            }
        }

        fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn used_elem(&self, slot: u16) -> (u32, u32) {
            let a = USED + 4 + 8 * u64::from(slot % self.size);
            (
                self.mem.read_obj(GuestAddress(a)).unwrap(),
                self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
            )
        }

        fn set_used_event(&self, v: u16) {
            let a = AVAIL + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(v.to_le(), GuestAddress(a)).unwrap();
        }

        fn avail_event(&self) -> u16 {
            let a = USED + 4 + 8 * u64::from(self.size);
            self.mem.read_obj(GuestAddress(a)).unwrap()
        }
    }

    fn pop_err(q: &mut Queue, mem: &GuestMemory) -> QueueError {
        match q.pop(mem) {
            Err(e) => e,
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    #[test]
    fn chains_of_one_to_many_descriptors() {
        let (mut d, mut q) = Driver::new(64);
        for n in 1..=20u16 {
            // n - 1 readable buffers of 10 bytes then one writable of 100 (n = 1: one writable).
            let bufs: Vec<(u32, bool)> = (0..n)
                .map(|k| if k + 1 == n { (100, true) } else { (10, false) })
                .collect();
            d.chain(0, &bufs);
            d.publish(0);
            let c = q.pop(&d.mem).unwrap().unwrap();
            assert_eq!(c.head_index(), 0);
            assert_eq!(c.descriptors().len(), usize::from(n));
            assert_eq!(c.readable().len(), usize::from(n - 1));
            assert_eq!(c.readable_len(), 10 * u64::from(n - 1));
            assert_eq!(c.writable_len(), 100);
            assert_eq!(c.descriptors()[0].addr, GuestAddress(DATA));
            q.add_used(&d.mem, 0, 7).unwrap();
            assert_eq!(d.used_idx(), n);
            assert_eq!(d.used_elem(n - 1), (0, 7));
            assert!(q.pop(&d.mem).unwrap().is_none());
        }
    }

    #[test]
    fn read_and_write_across_boundaries() {
        let (mut d, mut q) = Driver::new(16);
        d.chain(
            0,
            &[
                (3, false),
                (1, false),
                (5, false),
                (2, true),
                (0, true),
                (4, true),
            ],
        );
        d.mem.write_slice(b"abc", GuestAddress(DATA)).unwrap();
        d.mem
            .write_slice(b"d", GuestAddress(DATA + 0x1000))
            .unwrap();
        d.mem
            .write_slice(b"efghi", GuestAddress(DATA + 0x2000))
            .unwrap();
        d.publish(0);
        let c = q.pop(&d.mem).unwrap().unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (9, 6));

        let mut all = [0u8; 16];
        assert_eq!(c.read_at(&d.mem, 0, &mut all).unwrap(), 9);
        assert_eq!(&all[..9], b"abcdefghi");
        for off in 0..=9u64 {
            let mut b = [0u8; 4];
            let n = c.read_at(&d.mem, off, &mut b).unwrap();
            assert_eq!(n, 4.min(9 - off as usize));
            assert_eq!(&b[..n], &b"abcdefghi"[off as usize..off as usize + n]);
        }
        assert_eq!(c.read_at(&d.mem, 100, &mut all).unwrap(), 0);
        assert_eq!(c.read_at(&d.mem, u64::MAX, &mut all).unwrap(), 0);
        let mut four = [0u8; 4];
        assert!(c.read_exact_at(&d.mem, 5, &mut four).is_ok());
        assert_eq!(&four, b"fghi");
        assert!(matches!(
            c.read_exact_at(&d.mem, 6, &mut four),
            Err(QueueError::ChainTooShort { head: 0, .. })
        ));
        assert!(c.read_exact_at(&d.mem, u64::MAX, &mut four).is_err());

        // Writable part: 2 bytes at desc 3, 0 at desc 4, 4 at desc 5.
        assert_eq!(c.write_at(&d.mem, 1, b"XYZW").unwrap(), 4);
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(DATA + 0x3001)).unwrap(),
            b'X'
        );
        assert_eq!(
            d.mem
                .read_obj::<[u8; 3]>(GuestAddress(DATA + 0x5000))
                .unwrap(),
            *b"YZW"
        );
        assert_eq!(c.write_at(&d.mem, 4, b"123456").unwrap(), 2);
        assert!(c.write_all_at(&d.mem, 0, &[0; 6]).is_ok());
        assert!(c.write_all_at(&d.mem, 1, &[0; 6]).is_err());
        // Readable buffers are never written.
        assert_eq!(
            d.mem.read_obj::<[u8; 3]>(GuestAddress(DATA)).unwrap(),
            *b"abc"
        );
    }

    #[test]
    fn indirect_descriptors_follow_negotiation() {
        let (mut d, mut q) = Driver::new(8);
        let table = DATA + 0x80000;
        // An indirect table of 3 entries: the virtio-blk request shape.
        d.write_desc(table, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 1);
        d.write_desc(
            table,
            1,
            DATA + 0x1000,
            4096,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            2,
        );
        d.write_desc(table, 2, DATA + 0x2000, 1, VIRTQ_DESC_F_WRITE, 0);
        d.desc(5, table, 48, VIRTQ_DESC_F_INDIRECT, 0);

        d.publish(5);
        let e = pop_err(&mut q, &d.mem);
        assert!(matches!(
            e,
            QueueError::IndirectNotNegotiated { head: 5, index: 5 }
        ));
        assert_eq!(e.chain_head(), Some(5));
        q.add_used(&d.mem, 5, 0).unwrap();

        q.indirect = true;
        d.publish(5);
        let c = q.pop(&d.mem).unwrap().unwrap();
        assert_eq!(c.head_index(), 5);
        assert_eq!(c.descriptors().len(), 3);
        assert_eq!((c.readable_len(), c.writable_len()), (16, 4097));
        assert_eq!(c.writable()[1].addr, GuestAddress(DATA + 0x2000));
        q.add_used(&d.mem, 5, 1).unwrap();
        assert_eq!(d.used_idx(), 2);

        // A direct descriptor chained into an indirect one.
        d.desc(0, DATA + 0x7000, 8, VIRTQ_DESC_F_NEXT, 5);
        d.publish(0);
        let c = q.pop(&d.mem).unwrap().unwrap();
        assert_eq!(c.descriptors().len(), 4);
        assert_eq!(c.readable_len(), 24);
    }

    #[test]
    fn index_wraps_at_65535() {
        let (mut d, mut q) = Driver::new(4);
        let start = 65533u16;
        q.next_avail = start;
        q.next_used = start;
        d.avail_idx = start;
        d.set_avail_idx(start);
        for round in 0..6u16 {
            let head = round % 4;
            d.chain(head, &[(8, true)]);
            d.publish(head);
            let c = q.pop(&d.mem).unwrap().unwrap();
            assert_eq!(c.head_index(), head);
            q.add_used(&d.mem, head, u32::from(round)).unwrap();
            let idx = start.wrapping_add(round + 1);
            assert_eq!((q.next_avail, q.next_used, d.used_idx()), (idx, idx, idx));
            assert_eq!(
                d.used_elem(start.wrapping_add(round)),
                (u32::from(head), u32::from(round))
            );
        }
        assert_eq!(q.next_avail, 3);
        assert!(q.pop(&d.mem).unwrap().is_none());
    }

    #[test]
    fn many_in_flight_completed_out_of_order() {
        let (mut d, mut q) = Driver::new(32);
        // 16 two-descriptor chains at heads 0, 2, 4, ...
        for k in 0..16u16 {
            d.chain(2 * k, &[(4, false), (4, true)]);
            d.publish(2 * k);
        }
        let mut chains = Vec::new();
        while let Some(c) = q.pop(&d.mem).unwrap() {
            chains.push(c);
        }
        assert_eq!(chains.len(), 16);
        chains.reverse();
        for (n, c) in chains.iter().enumerate() {
            q.add_used(&d.mem, c.head_index(), n as u32).unwrap();
        }
        assert_eq!(d.used_idx(), 16);
        for n in 0..16u16 {
            assert_eq!(d.used_elem(n), (u32::from(30 - 2 * n), u32::from(n)));
        }
        // The driver reuses the freed descriptors.
        d.chain(0, &[(4, true)]);
        d.publish(0);
        assert_eq!(q.pop(&d.mem).unwrap().unwrap().descriptors().len(), 1);
    }

    #[test]
    fn notification_without_event_idx() {
        let (mut d, mut q) = Driver::new(8);
        d.chain(0, &[(4, true)]);
        d.publish(0);
        let c = q.pop(&d.mem).unwrap().unwrap();
        q.add_used(&d.mem, c.head_index(), 0).unwrap();
        assert!(q.needs_notification(&d.mem));
        d.mem
            .write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(), GuestAddress(AVAIL))
            .unwrap();
        assert!(!q.needs_notification(&d.mem));

        q.disable_notification(&d.mem);
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 1);
        assert!(!q.enable_notification(&d.mem));
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
        q.disable_notification(&d.mem);
        d.publish(0); // arrives while notifications are off
        assert!(q.enable_notification(&d.mem));
    }

    #[test]
    fn notification_with_event_idx() {
        let (mut d, mut q) = Driver::new(8);
        q.event_idx = true;
        // The flags field is ignored with EVENT_IDX.
        d.mem
            .write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(), GuestAddress(AVAIL))
            .unwrap();
        let complete = |d: &mut Driver, q: &mut Queue| {
            d.chain(0, &[(4, true)]);
            d.publish(0);
            let c = q.pop(&d.mem).unwrap().unwrap();
            q.add_used(&d.mem, c.head_index(), 4).unwrap();
        };
        complete(&mut d, &mut q); // used idx 1
        assert!(
            q.needs_notification(&d.mem),
            "first decision always notifies"
        );
        assert_eq!(q.signalled_used, Some(1));
        // Driver wants an interrupt once used idx passes 2 (used_event = 2).
        d.set_used_event(2);
        complete(&mut d, &mut q); // used idx 2: used_event 2 not yet passed
        assert!(!q.needs_notification(&d.mem));
        complete(&mut d, &mut q); // used idx 3: crossed 2 -> 3
        assert!(q.needs_notification(&d.mem));
        complete(&mut d, &mut q); // used idx 4: used_event 2 is behind, already signalled
        assert!(!q.needs_notification(&d.mem));
        // Batched completions crossing the event in the middle still notify.
        d.set_used_event(5);
        complete(&mut d, &mut q);
        complete(&mut d, &mut q);
        complete(&mut d, &mut q); // 4 -> 7 passes 5
        assert!(q.needs_notification(&d.mem));
        // Nothing new since the last decision: no notification.
        assert!(!q.needs_notification(&d.mem));

        // Wrap-around of the event rule.
        q.next_used = 65534;
        q.signalled_used = Some(65534);
        d.set_used_event(65535);
        q.next_used = 1; // 65534 -> 1 passes 65535
        assert!(q.needs_notification(&d.mem));

        // avail_event follows next_avail; enable reports buffers that raced in.
        q.disable_notification(&d.mem); // no-op with EVENT_IDX
        assert_eq!(d.mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
        assert!(!q.enable_notification(&d.mem));
        assert_eq!(d.avail_event(), q.next_avail);
        assert_eq!(q.next_avail, 7);
        d.publish(0);
        assert!(q.enable_notification(&d.mem));
        q.pop(&d.mem).unwrap().unwrap();
        assert!(!q.enable_notification(&d.mem));
        assert_eq!(d.avail_event(), 8);
    }

    #[test]
    fn notification_on_unreadable_rings_is_conservative() {
        let mem = memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut q = Queue::new(8);
        q.avail_ring = GuestAddress(u64::MAX - 1);
        q.used_ring = GuestAddress(0x10_0000);
        assert!(q.needs_notification(&mem));
        q.event_idx = true;
        assert!(q.needs_notification(&mem));
        assert!(q.needs_notification(&mem));
        assert!(q.enable_notification(&mem));
        q.disable_notification(&mem);
    }

    #[test]
    fn descriptor_loops_are_errors() {
        let (mut d, mut q) = Driver::new(8);
        // Self-loop.
        d.desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 0);
        d.publish(0);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::DescriptorLoop { head: 0, limit: 8 }
        ));
        // Cycle 1 -> 2 -> 3 -> 1.
        d.desc(1, DATA, 4, VIRTQ_DESC_F_NEXT, 2);
        d.desc(2, DATA, 4, VIRTQ_DESC_F_NEXT, 3);
        d.desc(3, DATA, 4, VIRTQ_DESC_F_NEXT, 1);
        d.publish(1);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::DescriptorLoop { head: 1, .. }
        ));
        // Loop inside an indirect table.
        q.indirect = true;
        let table = DATA + 0x40000;
        d.write_desc(table, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1);
        d.write_desc(table, 1, DATA, 4, VIRTQ_DESC_F_NEXT, 0);
        d.desc(4, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(4);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::DescriptorLoop { head: 4, .. }
        ));
        // Longer than the queue without a loop: direct + a full-size indirect table.
        for i in 0..8 {
            d.write_desc(
                table,
                i,
                DATA,
                4,
                if i < 7 { VIRTQ_DESC_F_NEXT } else { 0 },
                i + 1,
            );
        }
        d.desc(5, DATA, 4, VIRTQ_DESC_F_NEXT, 6);
        d.desc(6, table, 128, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(5);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::DescriptorLoop { head: 5, limit: 8 }
        ));
        // A full-size indirect table alone is fine.
        d.publish(6);
        assert_eq!(q.pop(&d.mem).unwrap().unwrap().descriptors().len(), 8);
        assert_eq!(q.next_avail, 5);
    }

    #[test]
    fn out_of_range_indices() {
        let (mut d, mut q) = Driver::new(8);
        d.publish(8);
        let e = pop_err(&mut q, &d.mem);
        assert!(matches!(e, QueueError::HeadOutOfRange { head: 8, size: 8 }));
        assert_eq!(e.chain_head(), None);
        d.publish(u16::MAX);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::HeadOutOfRange { .. }
        ));
        d.desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 8);
        d.publish(0);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::NextOutOfRange {
                head: 0,
                index: 0,
                next: 8,
                table_len: 8
            }
        ));
        // next beyond an indirect table (but inside the queue size).
        q.indirect = true;
        let table = DATA + 0x40000;
        d.write_desc(table, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 2);
        d.desc(1, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(1);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::NextOutOfRange {
                head: 1,
                next: 2,
                table_len: 2,
                ..
            }
        ));
        assert_eq!(q.next_avail, 4);
        assert!(matches!(
            q.add_used(&d.mem, 8, 0),
            Err(QueueError::UsedHeadOutOfRange { head: 8, size: 8 })
        ));
    }

    #[test]
    fn buffers_outside_memory_are_errors() {
        let (mut d, mut q) = Driver::new(8);
        let cases: [(u64, u32); 6] = [
            (MEM_SIZE as u64, 1),     // just past the end
            (MEM_SIZE as u64 - 4, 5), // straddles the end
            (u64::MAX, 1),            // wraps
            (u64::MAX - 10, 4096),    // wraps
            (0, u32::MAX),            // oversized
            (0x10_0000_0000, 0x1000), // far away
        ];
        for (addr, len) in cases {
            d.desc(0, addr, len, 0, 0);
            d.publish(0);
            let e = pop_err(&mut q, &d.mem);
            assert!(
                matches!(e, QueueError::BufferOutOfRange { head: 0, addr: a, len: l } if a == addr && l == len),
                "{e}"
            );
        }
        // Zero-length buffers are accepted anywhere and never touched.
        d.desc(0, u64::MAX, 0, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, DATA, 2, 0, 0);
        d.publish(0);
        let c = q.pop(&d.mem).unwrap().unwrap();
        assert_eq!(c.readable_len(), 2);
        let mut b = [0u8; 2];
        assert_eq!(c.read_at(&d.mem, 0, &mut b).unwrap(), 2);
        // An indirect table outside memory.
        q.indirect = true;
        d.desc(2, u64::MAX - 15, 16, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(2);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::BufferOutOfRange { head: 2, .. }
        ));
        d.desc(2, MEM_SIZE as u64 - 16, 32, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(2);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::BufferOutOfRange { head: 2, .. }
        ));
    }

    #[test]
    fn malformed_indirect_tables() {
        let (mut d, mut q) = Driver::new(8);
        q.indirect = true;
        let table = DATA + 0x40000;
        d.write_desc(table, 0, DATA, 4, 0, 0);
        // INDIRECT | NEXT.
        d.desc(0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
        d.publish(0);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::IndirectWithNext { head: 0, index: 0 }
        ));
        // Bad lengths: 0, not a multiple of 16, more entries than the queue size.
        for len in [0u32, 8, 17, 24, 16 * 9, !15u32] {
            d.desc(0, table, len, VIRTQ_DESC_F_INDIRECT, 0);
            d.publish(0);
            let e = pop_err(&mut q, &d.mem);
            assert!(
                matches!(e, QueueError::IndirectTableLength { head: 0, len: l, size: 8 } if l == len),
                "{e}"
            );
        }
        // Nested indirect.
        d.write_desc(table, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1);
        d.write_desc(table, 1, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        d.desc(0, table, 32, VIRTQ_DESC_F_INDIRECT, 0);
        d.publish(0);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::NestedIndirect { head: 0, index: 1 }
        ));
    }

    #[test]
    fn writable_before_readable_is_an_error() {
        let (mut d, mut q) = Driver::new(8);
        d.chain(0, &[(4, false), (4, true), (4, false)]);
        d.publish(0);
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::ReadableAfterWritable { head: 0, index: 2 }
        ));
    }

    #[test]
    fn avail_idx_jump_consumes_nothing() {
        let (mut d, mut q) = Driver::new(8);
        d.chain(0, &[(4, false)]);
        d.publish(0);
        d.set_avail_idx(9); // claims 9 new entries in a ring of 8
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::AvailIndexJump {
                avail_idx: 9,
                next_avail: 0,
                size: 8
            }
        ));
        assert_eq!(q.next_avail, 0);
        d.set_avail_idx(u16::MAX); // "behind": also a jump of 65535
        assert!(matches!(
            pop_err(&mut q, &d.mem),
            QueueError::AvailIndexJump { .. }
        ));
        d.set_avail_idx(8); // exactly full is fine
        for _ in 0..8 {
            q.pop(&d.mem).unwrap().unwrap();
        }
        assert!(q.pop(&d.mem).unwrap().is_none());
    }

    #[test]
    fn valid_chains_work_after_bad_ones() {
        let (mut d, mut q) = Driver::new(8);
        d.desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 0); // loop
        d.desc(1, u64::MAX, 4, 0, 0); // out of range
        d.chain(2, &[(4, true), (4, false)]); // order
        d.chain(4, &[(4, false), (8, true)]); // good
        for head in [0, 7 + 100, 1, 2, 4] {
            d.publish(head);
        }
        let mut results = Vec::new();
        for _ in 0..5 {
            match q.pop(&d.mem) {
                Ok(Some(c)) => {
                    q.add_used(&d.mem, c.head_index(), 8).unwrap();
                    results.push(Ok(c.head_index()));
                }
                Ok(None) => panic!("ran dry"),
                Err(e) => {
                    if let Some(h) = e.chain_head() {
                        q.add_used(&d.mem, h, 0).unwrap();
                    }
                    results.push(Err(e.chain_head()));
                }
            }
        }
        assert_eq!(
            results,
            [Err(Some(0)), Err(None), Err(Some(1)), Err(Some(2)), Ok(4)]
        );
        assert!(q.pop(&d.mem).unwrap().is_none());
        assert_eq!((q.next_avail, q.next_used, d.used_idx()), (5, 4, 4));
        assert_eq!(d.used_elem(3), (4, 8));
    }

    #[test]
    fn queue_configuration_validation() {
        let mem = memory::create(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(256);
        q.desc_table = GuestAddress(0);
        q.avail_ring = GuestAddress(0x1000);
        q.used_ring = GuestAddress(0x2000);
        assert!(q.is_valid(&mem));
        for size in [0u16, 3, 100, 255, 512, u16::MAX] {
            q.size = size;
            assert!(!q.is_valid(&mem), "size {size}");
        }
        for size in [1u16, 2, 128, 256] {
            q.size = size;
            assert!(q.is_valid(&mem), "size {size}");
        }
        // Misalignment.
        for (desc, avail, used) in [
            (8, 0x1000, 0x2000),
            (0, 0x1001, 0x2000),
            (0, 0x1000, 0x2002),
        ] {
            q.desc_table = GuestAddress(desc);
            q.avail_ring = GuestAddress(avail);
            q.used_ring = GuestAddress(used);
            assert!(!q.is_valid(&mem));
        }
        // Outside memory, partly outside, wrapping.
        q.desc_table = GuestAddress(0);
        q.avail_ring = GuestAddress(0x1000);
        for used in [0x10000, 0x10000 - 8 * 256, !3u64, 0x1_0000_0000] {
            q.used_ring = GuestAddress(used);
            assert!(!q.is_valid(&mem), "used {used:#x}");
        }
        q.used_ring = GuestAddress(0x10000 - 8 - 8 * 256); // fits with 2 bytes to spare
        assert!(q.is_valid(&mem));
        q.desc_table = GuestAddress(!15u64);
        assert!(!q.is_valid(&mem));
        q.desc_table = GuestAddress(0x10000 - 16 * 256);
        q.avail_ring = GuestAddress(0x10000 - 6 - 2 * 256);
        assert!(q.is_valid(&mem));
        // A bad maximum makes every size invalid.
        let mut bad = Queue::new(100);
        bad.size = 64;
        assert!(!bad.is_valid(&mem));
    }

    #[test]
    fn unusable_queue_never_panics() {
        let mem = memory::create(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut q = Queue::new(8);
        assert!(matches!(q.pop(&mem), Err(QueueError::NotReady { .. })));
        assert!(matches!(
            q.add_used(&mem, 0, 0),
            Err(QueueError::NotReady { .. })
        ));
        q.ready = true;
        q.size = 0;
        assert!(matches!(q.pop(&mem), Err(QueueError::NotReady { .. })));
        q.size = 6;
        assert!(matches!(q.pop(&mem), Err(QueueError::NotReady { .. })));
        // Ready without is_valid(): rings at the top of the address space.
        q.size = 8;
        q.desc_table = GuestAddress(u64::MAX - 15);
        q.avail_ring = GuestAddress(u64::MAX - 1);
        q.used_ring = GuestAddress(u64::MAX - 3);
        assert!(matches!(q.pop(&mem), Err(QueueError::RingAccess { .. })));
        assert!(matches!(
            q.add_used(&mem, 0, 0),
            Err(QueueError::RingAccess { .. })
        ));
        // Avail ring readable, descriptor table not.
        q.avail_ring = GuestAddress(0x100);
        mem.write_obj(1u16.to_le(), GuestAddress(0x102)).unwrap();
        mem.write_obj(7u16.to_le(), GuestAddress(0x104)).unwrap();
        assert!(matches!(
            q.pop(&mem),
            Err(QueueError::BufferOutOfRange { head: 7, .. })
        ));
        assert_eq!((q.next_avail, q.next_used), (1, 0));
        // A synthetic chain with a wrapping address errors instead of overflowing.
        let d = Descriptor {
            addr: GuestAddress(u64::MAX),
            len: 4,
            writable: true,
        };
        let c = DescriptorChain::from_descriptors(0, &[d]).unwrap();
        assert!(c.write_at(&mem, 2, &[1, 2]).is_err());
        assert!(c.read_at(&mem, 0, &mut [0; 2]).unwrap() == 0);
    }

    #[test]
    fn reset_restores_initial_state() {
        let (mut d, mut q) = Driver::new(8);
        q.event_idx = true;
        q.indirect = true;
        d.chain(0, &[(4, true)]);
        d.publish(0);
        q.pop(&d.mem).unwrap().unwrap();
        q.add_used(&d.mem, 0, 0).unwrap();
        q.needs_notification(&d.mem);
        q.reset();
        assert_eq!(q, Queue::new(256));
    }
}

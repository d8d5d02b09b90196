//! The 44-byte `struct virtio_vsock_hdr` (virtio 1.2, section 5.10.6): parsing, encoding and
//! validation of what the guest puts in front of every packet.
//!
//! All fields are little-endian:
//!
//! | offset | field | type |
//! |---|---|---|
//! | 0 | `src_cid` | u64 |
//! | 8 | `dst_cid` | u64 |
//! | 16 | `src_port` | u32 |
//! | 20 | `dst_port` | u32 |
//! | 24 | `len` (payload bytes after the header) | u32 |
//! | 28 | `type` ([`VSOCK_TYPE_STREAM`]) | u16 |
//! | 30 | `op` ([`Op`]) | u16 |
//! | 32 | `flags` (SHUTDOWN flags) | u32 |
//! | 36 | `buf_alloc` (sender's receive buffer) | u32 |
//! | 40 | `fwd_cnt` (bytes the sender consumed) | u32 |
//!
//! [`PacketHeader::parse`] never fails (any 44 bytes are a header); [`PacketHeader::validate`]
//! decides whether a guest packet may reach the connection table.
//!
//! # Example
//! ```
//! use smolvm::devices::virtio::vsock::packet::{Op, PacketHeader, HDR_LEN, VSOCK_TYPE_STREAM};
//!
//! let hdr = PacketHeader {
//!     src_cid: 3, dst_cid: 2, src_port: 1025, dst_port: 52, len: 0,
//!     type_: VSOCK_TYPE_STREAM, op: Op::Request as u16, flags: 0, buf_alloc: 4096, fwd_cnt: 0,
//! };
//! let bytes: [u8; HDR_LEN] = hdr.encode();
//! assert_eq!(PacketHeader::parse(&bytes), hdr);
//! assert_eq!(hdr.validate(3, 65536), Ok(Op::Request));
//! ```

/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;
/// The host's CID: the destination of every guest packet this device serves.
pub const VSOCK_HOST_CID: u64 = 2;
/// Socket type of stream sockets, the only type this device supports.
pub const VSOCK_TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_SHUTDOWN_F_SEND: u32 = 2;

/// Packet operations (`op`).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::packet::Op;
/// assert_eq!(Op::from_u16(5), Some(Op::Rw));
/// assert_eq!(Op::from_u16(0), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or aborted.
    Rst = 3,
    /// The sender stops receiving and/or sending (`flags`).
    Shutdown = 4,
    /// Data (`len` payload bytes).
    Rw = 5,
    /// Unsolicited credit information (`buf_alloc`, `fwd_cnt`).
    CreditUpdate = 6,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl Op {
    /// The operation with wire value `v`, if known.
    ///
    /// # Example
    /// See [`Op`].
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a guest packet was not accepted ([`PacketHeader::validate`]).
///
/// # Example
/// ```
/// use smolvm::devices::virtio::vsock::packet::PacketError;
/// assert!(PacketError::UnknownOp(9).to_string().contains("9"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The chain holds fewer than [`HDR_LEN`] readable bytes.
    #[error("packet shorter than the {HDR_LEN}-byte header ({0} bytes)")]
    TooShort(u64),
    /// `src_cid` is not the guest's CID (spoofing or a confused driver).
    #[error("source CID {found} is not the guest's CID {expected}")]
    WrongSrcCid {
        /// CID in the packet.
        found: u64,
        /// The configured guest CID.
        expected: u64,
    },
    /// `dst_cid` is not the host ([`VSOCK_HOST_CID`]).
    #[error("destination CID {0} is not the host (2)")]
    WrongDstCid(u64),
    /// `type` is not [`VSOCK_TYPE_STREAM`].
    #[error("socket type {0} is not supported (stream only)")]
    UnsupportedType(u16),
    /// `op` is not an [`Op`].
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    /// `len` exceeds the largest payload the device accepts.
    #[error("payload length {len} exceeds the maximum of {max}")]
    TooLong {
        /// Declared payload length.
        len: u32,
        /// The device's limit.
        max: u32,
    },
    /// `len` exceeds the readable bytes the chain carries after the header.
    #[error("payload length {len} exceeds the {available} bytes after the header")]
    Truncated {
        /// Declared payload length.
        len: u32,
        /// Readable bytes after the header.
        available: u64,
    },
}

/// A decoded `virtio_vsock_hdr` (field meanings in the [module documentation](self)).
///
/// # Example
/// See the [module example](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation ([`Op`] as `u16`, unvalidated).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer (free-running).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8; HDR_LEN], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8; HDR_LEN], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

impl PacketHeader {
    /// Decodes 44 header bytes. Never fails: validation is [`validate`](Self::validate)'s job.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::vsock::packet::{PacketHeader, HDR_LEN};
    /// let mut b = [0u8; HDR_LEN];
    /// b[30] = 5; // op = RW
    /// assert_eq!(PacketHeader::parse(&b).op, 5);
    /// ```
    pub fn parse(b: &[u8; HDR_LEN]) -> PacketHeader {
        PacketHeader {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Decodes the first [`HDR_LEN`] bytes of `b`.
    ///
    /// # Errors
    /// [`PacketError::TooShort`] when `b` is shorter than a header.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::vsock::packet::PacketHeader;
    /// assert!(PacketHeader::from_bytes(&[0u8; 43]).is_err());
    /// assert!(PacketHeader::from_bytes(&[0u8; 50]).is_ok());
    /// ```
    pub fn from_bytes(b: &[u8]) -> Result<PacketHeader, PacketError> {
        let h: &[u8; HDR_LEN] = b
            .get(..HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::TooShort(b.len() as u64))?;
        Ok(Self::parse(h))
    }

    /// Encodes the header in wire format.
    ///
    /// # Example
    /// See the [module example](self).
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a packet the guest (CID `guest_cid`) sent to the host: addresses, type, operation
    /// and `len <= max_payload`. Returns the operation.
    ///
    /// The checks run in that order, so the caller can answer a packet with a valid address but
    /// an unsupported type with RST, and silently drop one with a wrong address (spec 5.10.6.3:
    /// the device must not let the guest spoof its source).
    ///
    /// # Errors
    /// The first [`PacketError`] that applies.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::vsock::packet::{PacketError, PacketHeader, VSOCK_TYPE_STREAM};
    /// let h = PacketHeader { src_cid: 4, dst_cid: 2, type_: VSOCK_TYPE_STREAM, op: 5, ..Default::default() };
    /// assert_eq!(h.validate(3, 4096), Err(PacketError::WrongSrcCid { found: 4, expected: 3 }));
    /// ```
    pub fn validate(&self, guest_cid: u64, max_payload: u32) -> Result<Op, PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::WrongSrcCid {
                found: self.src_cid,
                expected: guest_cid,
            });
        }
        if self.dst_cid != VSOCK_HOST_CID {
            return Err(PacketError::WrongDstCid(self.dst_cid));
        }
        if self.type_ != VSOCK_TYPE_STREAM {
            return Err(PacketError::UnsupportedType(self.type_));
        }
        let op = Op::from_u16(self.op).ok_or(PacketError::UnknownOp(self.op))?;
        if self.len > max_payload {
            return Err(PacketError::TooLong {
                len: self.len,
                max: max_payload,
            });
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: Op) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 1,
            dst_port: 2,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let h = PacketHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 0x1112_1314_1516_1718,
            src_port: 0x2122_2324,
            dst_port: 0x3132_3334,
            len: 0x4142_4344,
            type_: 0x5152,
            op: 0x6162,
            flags: 0x7172_7374,
            buf_alloc: 0x8182_8384,
            fwd_cnt: 0x9192_9394,
        };
        let b = h.encode();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x18);
        assert_eq!(b[16], 0x24);
        assert_eq!(b[20], 0x34);
        assert_eq!(b[24], 0x44);
        assert_eq!(b[28], 0x52);
        assert_eq!(b[30], 0x62);
        assert_eq!(b[32], 0x74);
        assert_eq!(b[36], 0x84);
        assert_eq!(b[40], 0x94);
        assert_eq!(b[43], 0x91);
        assert_eq!(PacketHeader::parse(&b), h);
        assert_eq!(PacketHeader::from_bytes(&b).unwrap(), h);
    }

    #[test]
    fn validation_order_and_limits() {
        assert_eq!(hdr(Op::Rw).validate(3, 10), Ok(Op::Rw));
        let mut h = hdr(Op::Rw);
        h.dst_cid = 3;
        assert_eq!(h.validate(3, 10), Err(PacketError::WrongDstCid(3)));
        let mut h = hdr(Op::Rw);
        h.type_ = 2; // SEQPACKET
        assert_eq!(h.validate(3, 10), Err(PacketError::UnsupportedType(2)));
        let mut h = hdr(Op::Rw);
        h.op = 0;
        assert_eq!(h.validate(3, 10), Err(PacketError::UnknownOp(0)));
        h.op = 8;
        assert_eq!(h.validate(3, 10), Err(PacketError::UnknownOp(8)));
        let mut h = hdr(Op::Rw);
        h.len = 11;
        assert_eq!(
            h.validate(3, 10),
            Err(PacketError::TooLong { len: 11, max: 10 })
        );
        for v in 1..=7 {
            assert_eq!(Op::from_u16(v).map(|o| o as u16), Some(v));
        }
        assert_eq!(
            PacketHeader::from_bytes(&[0; 10]),
            Err(PacketError::TooShort(10))
        );
    }
}

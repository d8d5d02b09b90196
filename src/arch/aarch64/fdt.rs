//! Flattened device tree (DTB, format version 17): a small writer, a small reader, and the
//! device tree smolvm gives an arm64 Linux guest.
//!
//! The format (Devicetree Specification v0.4, chapter 5): a 40-byte header, the memory
//! reservation block, the structure block (big-endian tokens `FDT_BEGIN_NODE`, `FDT_PROP`,
//! `FDT_END_NODE`, `FDT_END`, each item padded to 4 bytes) and the strings block holding the
//! property names.
//!
//! # Example
//! ```
//! use smolvm::arch::aarch64::fdt::{parse, FdtWriter};
//! let mut w = FdtWriter::new();
//! w.begin_node("")?;
//! w.property_string("model", "toy")?;
//! w.begin_node("chosen")?;
//! w.property_string("bootargs", "console=ttyS0")?;
//! w.end_node()?;
//! w.end_node()?;
//! let blob = w.finish()?;
//! let root = parse(&blob)?;
//! assert_eq!(root.find("/chosen").and_then(|n| n.string("bootargs")), Some("console=ttyS0"));
//! # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
//! ```

use std::collections::HashMap;

use super::layout;
use super::regs::MPIDR_AFFINITY_MASK;
use crate::devices::virtio::mmio::MmioSlot;

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_VERSION: u32 = 17;
const FDT_LAST_COMP_VERSION: u32 = 16;
const HEADER_SIZE: usize = 40;
/// The memory reservation block holds only its terminating (zero) entry.
const RESERVE_MAP_SIZE: usize = 16;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Deepest node nesting the reader accepts (real trees are a handful of levels deep).
const MAX_DEPTH: usize = 64;

/// Interrupt specifier cells of the GICv3 binding (`#interrupt-cells = <3>`).
mod gic {
    /// First cell: a shared peripheral interrupt.
    pub const SPI: u32 = 0;
    /// First cell: a private peripheral interrupt.
    pub const PPI: u32 = 1;
    /// Third cell: rising edge.
    pub const EDGE_RISING: u32 = 1;
    /// Third cell: active-high level.
    pub const LEVEL_HIGH: u32 = 4;
}

/// Why a device tree could not be written or read.
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::fdt::{parse, FdtError};
/// assert!(matches!(parse(&[0xd0, 0x0d, 0xfe, 0xed]), Err(FdtError::Truncated { .. })));
/// assert!(matches!(parse(&[0u8; 64]), Err(FdtError::BadMagic(0))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FdtError {
    /// A node or property name that the format cannot hold (empty, a NUL byte, or a non-root
    /// node without a name).
    #[error("invalid device tree name {0:?}: names are non-empty and contain no NUL byte")]
    InvalidName(String),
    /// A string property value with a NUL byte inside.
    #[error("device tree string property {0:?} contains a NUL byte")]
    InvalidString(String),
    /// `begin_node`/`end_node` calls do not pair up, or a property is outside any node.
    #[error("device tree writer misuse: {0}")]
    Unbalanced(&'static str),
    /// The blob would exceed what the format's 32-bit offsets (or the caller) allow.
    #[error("device tree of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Size of the blob.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The blob does not start with the FDT magic.
    #[error("not a flattened device tree (magic {0:#010x}, expected 0xd00dfeed)")]
    BadMagic(u32),
    /// The blob ends before a structure it announces.
    #[error("device tree truncated: {what} needs bytes up to {needed}, blob has {len}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Offset needed.
        needed: usize,
        /// Length of the blob.
        len: usize,
    },
    /// The structure block is not a well-formed token stream.
    #[error("malformed device tree: {0}")]
    Malformed(String),
}

type Result<T> = std::result::Result<T, FdtError>;

/// Writes a DTB: nodes and properties in document order, then [`FdtWriter::finish`].
///
/// # Example
/// See the [module documentation](self).
#[derive(Debug, Default)]
pub struct FdtWriter {
    structure: Vec<u8>,
    strings: Vec<u8>,
    string_offsets: HashMap<String, u32>,
    depth: usize,
    root_done: bool,
    boot_cpuid: u32,
}

impl FdtWriter {
    /// An empty tree. The first node must be the root (`begin_node("")`).
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the header's `boot_cpuid_phys` (the boot CPU's `reg`; 0 by default).
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.set_boot_cpuid(0);
    /// ```
    pub fn set_boot_cpuid(&mut self, id: u32) {
        self.boot_cpuid = id;
    }

    fn token(&mut self, t: u32) {
        self.structure.extend_from_slice(&t.to_be_bytes());
    }

    fn pad(&mut self) {
        while self.structure.len() % 4 != 0 {
            self.structure.push(0);
        }
    }

    /// Opens node `name` (`""` for the root, `"name@unit-address"` for the others).
    ///
    /// # Errors
    /// [`FdtError::InvalidName`], or [`FdtError::Unbalanced`] for a second root.
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn begin_node(&mut self, name: &str) -> Result<()> {
        if name.contains('\0') || name.contains('/') {
            return Err(FdtError::InvalidName(name.into()));
        }
        if self.depth == 0 {
            if self.root_done {
                return Err(FdtError::Unbalanced("a second root node"));
            }
            if !name.is_empty() {
                return Err(FdtError::InvalidName(name.into()));
            }
        } else if name.is_empty() {
            return Err(FdtError::InvalidName(name.into()));
        }
        self.token(FDT_BEGIN_NODE);
        self.structure.extend_from_slice(name.as_bytes());
        self.structure.push(0);
        self.pad();
        self.depth += 1;
        Ok(())
    }

    /// Closes the innermost open node.
    ///
    /// # Errors
    /// [`FdtError::Unbalanced`] when no node is open.
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn end_node(&mut self) -> Result<()> {
        if self.depth == 0 {
            return Err(FdtError::Unbalanced("end_node without an open node"));
        }
        self.token(FDT_END_NODE);
        self.depth -= 1;
        if self.depth == 0 {
            self.root_done = true;
        }
        Ok(())
    }

    /// Adds a property with raw bytes as its value.
    ///
    /// # Errors
    /// [`FdtError::InvalidName`], or [`FdtError::Unbalanced`] outside any node.
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property("blob", &[1, 2, 3])?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property(&mut self, name: &str, value: &[u8]) -> Result<()> {
        if self.depth == 0 {
            return Err(FdtError::Unbalanced("a property outside any node"));
        }
        if name.is_empty() || name.contains('\0') {
            return Err(FdtError::InvalidName(name.into()));
        }
        let len = u32::try_from(value.len()).map_err(|_| FdtError::TooLarge {
            size: value.len(),
            limit: u32::MAX as usize,
        })?;
        let nameoff = self.string_offset(name)?;
        self.token(FDT_PROP);
        self.structure.extend_from_slice(&len.to_be_bytes());
        self.structure.extend_from_slice(&nameoff.to_be_bytes());
        self.structure.extend_from_slice(value);
        self.pad();
        Ok(())
    }

    fn string_offset(&mut self, name: &str) -> Result<u32> {
        if let Some(&off) = self.string_offsets.get(name) {
            return Ok(off);
        }
        let off = u32::try_from(self.strings.len()).map_err(|_| FdtError::TooLarge {
            size: self.strings.len(),
            limit: u32::MAX as usize,
        })?;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        self.string_offsets.insert(name.into(), off);
        Ok(off)
    }

    /// Adds an empty property (a boolean such as `interrupt-controller`).
    ///
    /// # Errors
    /// As [`FdtWriter::property`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_null("dma-coherent")?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_null(&mut self, name: &str) -> Result<()> {
        self.property(name, &[])
    }

    /// Adds a one-cell (`u32`) property.
    ///
    /// # Errors
    /// As [`FdtWriter::property`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_u32("#address-cells", 2)?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_u32(&mut self, name: &str, value: u32) -> Result<()> {
        self.property(name, &value.to_be_bytes())
    }

    /// Adds a two-cell (`u64`) property.
    ///
    /// # Errors
    /// As [`FdtWriter::property`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_u64("linux,initrd-start", 0x9000_0000)?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_u64(&mut self, name: &str, value: u64) -> Result<()> {
        self.property(name, &value.to_be_bytes())
    }

    /// Adds a property of several cells.
    ///
    /// # Errors
    /// As [`FdtWriter::property`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_cells("interrupts", &[0, 16, 1])?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_cells(&mut self, name: &str, cells: &[u32]) -> Result<()> {
        let bytes: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.property(name, &bytes)
    }

    /// Adds a property of several 64-bit values (address/size pairs with two cells each).
    ///
    /// # Errors
    /// As [`FdtWriter::property`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_u64s("reg", &[0x8000_0000, 0x1000_0000])?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_u64s(&mut self, name: &str, values: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.property(name, &bytes)
    }

    /// Adds a NUL-terminated string property.
    ///
    /// # Errors
    /// [`FdtError::InvalidString`] for a NUL inside `value`; otherwise as
    /// [`FdtWriter::property`].
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn property_string(&mut self, name: &str, value: &str) -> Result<()> {
        self.property_strings(name, &[value])
    }

    /// Adds a string-list property (`compatible = "a", "b"`).
    ///
    /// # Errors
    /// As [`FdtWriter::property_string`].
    ///
    /// # Example
    /// ```
    /// let mut w = smolvm::arch::aarch64::fdt::FdtWriter::new();
    /// w.begin_node("")?;
    /// w.property_strings("compatible", &["arm,psci-0.2", "arm,psci"])?;
    /// # Ok::<(), smolvm::arch::aarch64::fdt::FdtError>(())
    /// ```
    pub fn property_strings(&mut self, name: &str, values: &[&str]) -> Result<()> {
        let mut bytes = Vec::new();
        for v in values {
            if v.contains('\0') {
                return Err(FdtError::InvalidString(name.into()));
            }
            bytes.extend_from_slice(v.as_bytes());
            bytes.push(0);
        }
        self.property(name, &bytes)
    }

    /// Ends the tree and returns the blob.
    ///
    /// # Errors
    /// [`FdtError::Unbalanced`] when a node is still open or there is no root;
    /// [`FdtError::TooLarge`] beyond 4 GiB.
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if self.depth != 0 {
            return Err(FdtError::Unbalanced("a node is still open"));
        }
        if !self.root_done {
            return Err(FdtError::Unbalanced("no root node"));
        }
        self.token(FDT_END);
        let off_struct = HEADER_SIZE + RESERVE_MAP_SIZE;
        let off_strings = off_struct + self.structure.len();
        let total = off_strings + self.strings.len();
        let to_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| FdtError::TooLarge {
                size: total,
                limit: u32::MAX as usize,
            })
        };
        let header = [
            FDT_MAGIC,
            to_u32(total)?,
            to_u32(off_struct)?,
            to_u32(off_strings)?,
            HEADER_SIZE as u32,
            FDT_VERSION,
            FDT_LAST_COMP_VERSION,
            self.boot_cpuid,
            to_u32(self.strings.len())?,
            to_u32(self.structure.len())?,
        ];
        let mut blob = Vec::with_capacity(total);
        for word in header {
            blob.extend_from_slice(&word.to_be_bytes());
        }
        blob.extend_from_slice(&[0u8; RESERVE_MAP_SIZE]);
        blob.extend_from_slice(&self.structure);
        blob.extend_from_slice(&self.strings);
        Ok(blob)
    }
}

/// One node of a parsed device tree.
///
/// # Example
/// See the [module documentation](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdtNode {
    /// The node name with its unit address (`""` for the root).
    pub name: String,
    /// Properties in document order: name and raw value.
    pub properties: Vec<(String, Vec<u8>)>,
    /// Child nodes in document order.
    pub children: Vec<FdtNode>,
}

impl FdtNode {
    /// The raw value of property `name`.
    ///
    /// # Example
    /// See [`FdtNode::find`].
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The direct child called `name`.
    ///
    /// # Example
    /// See [`FdtNode::find`].
    pub fn child(&self, name: &str) -> Option<&FdtNode> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The node at absolute `path` below this one (`"/"` is this node).
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::fdt::FdtNode;
    /// let cpu = FdtNode { name: "cpu@0".into(), ..Default::default() };
    /// let cpus = FdtNode { name: "cpus".into(), children: vec![cpu], ..Default::default() };
    /// let root = FdtNode { children: vec![cpus], ..Default::default() };
    /// assert_eq!(root.find("/cpus/cpu@0").map(|n| n.name.as_str()), Some("cpu@0"));
    /// assert!(root.find("/memory").is_none());
    /// ```
    pub fn find(&self, path: &str) -> Option<&FdtNode> {
        path.split('/')
            .filter(|p| !p.is_empty())
            .try_fold(self, |node, part| node.child(part))
    }

    /// Property `name` as big-endian 32-bit cells; `None` if absent or not a multiple of 4.
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::fdt::FdtNode;
    /// let n = FdtNode { properties: vec![("x".into(), vec![0, 0, 0, 7])], ..Default::default() };
    /// assert_eq!(n.cells("x"), Some(vec![7]));
    /// ```
    pub fn cells(&self, name: &str) -> Option<Vec<u32>> {
        let v = self.property(name)?;
        (v.len() % 4 == 0).then(|| {
            v.chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// Property `name` as big-endian 64-bit values (two cells each).
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::fdt::FdtNode;
    /// let n = FdtNode { properties: vec![("x".into(), 5u64.to_be_bytes().to_vec())], ..Default::default() };
    /// assert_eq!(n.u64s("x"), Some(vec![5]));
    /// ```
    pub fn u64s(&self, name: &str) -> Option<Vec<u64>> {
        let v = self.property(name)?;
        (v.len() % 8 == 0).then(|| {
            v.chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_be_bytes(b)
                })
                .collect()
        })
    }

    /// Property `name` as one NUL-terminated UTF-8 string.
    ///
    /// # Example
    /// See the [module documentation](self).
    pub fn string(&self, name: &str) -> Option<&str> {
        let v = self.property(name)?;
        let s = v.strip_suffix(&[0])?;
        if s.contains(&0) {
            return None;
        }
        std::str::from_utf8(s).ok()
    }

    /// Property `name` as a string list.
    ///
    /// # Example
    /// ```
    /// use smolvm::arch::aarch64::fdt::FdtNode;
    /// let n = FdtNode { properties: vec![("c".into(), b"a\0b\0".to_vec())], ..Default::default() };
    /// assert_eq!(n.strings("c"), Some(vec!["a", "b"]));
    /// ```
    pub fn strings(&self, name: &str) -> Option<Vec<&str>> {
        let v = self.property(name)?;
        let s = v.strip_suffix(&[0])?;
        s.split(|&b| b == 0)
            .map(|part| std::str::from_utf8(part).ok())
            .collect()
    }
}

fn be32(blob: &[u8], off: usize, what: &'static str) -> Result<u32> {
    let end = off.checked_add(4).ok_or(FdtError::Truncated {
        what,
        needed: usize::MAX,
        len: blob.len(),
    })?;
    let b = blob.get(off..end).ok_or(FdtError::Truncated {
        what,
        needed: end,
        len: blob.len(),
    })?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a DTB back into a tree of [`FdtNode`]s (the root is returned). Never panics on
/// malformed input.
///
/// # Errors
/// [`FdtError::BadMagic`], [`FdtError::Truncated`] or [`FdtError::Malformed`].
///
/// # Example
/// See the [module documentation](self).
pub fn parse(blob: &[u8]) -> Result<FdtNode> {
    let magic = be32(blob, 0, "header")?;
    if magic != FDT_MAGIC {
        return Err(FdtError::BadMagic(magic));
    }
    if blob.len() < HEADER_SIZE {
        return Err(FdtError::Truncated {
            what: "header",
            needed: HEADER_SIZE,
            len: blob.len(),
        });
    }
    let total = be32(blob, 4, "header")? as usize;
    let off_struct = be32(blob, 8, "header")? as usize;
    let off_strings = be32(blob, 12, "header")? as usize;
    let version = be32(blob, 20, "header")?;
    let size_strings = be32(blob, 32, "header")? as usize;
    let size_struct = be32(blob, 36, "header")? as usize;
    if version < FDT_LAST_COMP_VERSION {
        return Err(FdtError::Malformed(format!(
            "unsupported version {version}"
        )));
    }
    if total > blob.len() {
        return Err(FdtError::Truncated {
            what: "totalsize",
            needed: total,
            len: blob.len(),
        });
    }
    let blob = &blob[..total];
    let slice = |off: usize, size: usize, what: &'static str| {
        off.checked_add(size)
            .and_then(|end| blob.get(off..end))
            .ok_or(FdtError::Truncated {
                what,
                needed: off.saturating_add(size),
                len: blob.len(),
            })
    };
    let structure = slice(off_struct, size_struct, "structure block")?;
    let strings = slice(off_strings, size_strings, "strings block")?;

    let mut stack: Vec<FdtNode> = Vec::new();
    let mut root: Option<FdtNode> = None;
    let mut pos = 0usize;
    loop {
        let token = be32(structure, pos, "structure token")?;
        pos += 4;
        match token {
            FDT_BEGIN_NODE => {
                if root.is_some() {
                    return Err(FdtError::Malformed("a node after the root".into()));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(FdtError::Malformed(format!(
                        "nodes nested over {MAX_DEPTH}"
                    )));
                }
                let rest = structure.get(pos..).unwrap_or(&[]);
                let nul = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(FdtError::Truncated {
                        what: "node name",
                        needed: structure.len() + 1,
                        len: structure.len(),
                    })?;
                let name = std::str::from_utf8(&rest[..nul])
                    .map_err(|_| FdtError::Malformed("node name is not UTF-8".into()))?;
                stack.push(FdtNode {
                    name: name.into(),
                    ..Default::default()
                });
                pos = align4(pos + nul + 1);
            }
            FDT_END_NODE => {
                let node = stack
                    .pop()
                    .ok_or_else(|| FdtError::Malformed("FDT_END_NODE without a node".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            FDT_PROP => {
                let len = be32(structure, pos, "property header")? as usize;
                let nameoff = be32(structure, pos + 4, "property header")? as usize;
                pos += 8;
                let value = pos
                    .checked_add(len)
                    .and_then(|end| structure.get(pos..end))
                    .ok_or(FdtError::Truncated {
                        what: "property value",
                        needed: pos.saturating_add(len),
                        len: structure.len(),
                    })?;
                let name_bytes = strings.get(nameoff..).unwrap_or(&[]);
                let name_len = name_bytes.iter().position(|&b| b == 0).ok_or_else(|| {
                    FdtError::Malformed(format!("property name offset {nameoff} is invalid"))
                })?;
                let name = std::str::from_utf8(&name_bytes[..name_len])
                    .map_err(|_| FdtError::Malformed("property name is not UTF-8".into()))?;
                let node = stack
                    .last_mut()
                    .ok_or_else(|| FdtError::Malformed("a property outside any node".into()))?;
                node.properties.push((name.into(), value.to_vec()));
                pos = align4(pos + len);
            }
            FDT_NOP => {}
            FDT_END => {
                if !stack.is_empty() {
                    return Err(FdtError::Malformed("FDT_END inside a node".into()));
                }
                return root.ok_or_else(|| FdtError::Malformed("no root node".into()));
            }
            other => {
                return Err(FdtError::Malformed(format!(
                    "unknown token {other:#x} at structure offset {}",
                    pos - 4
                )))
            }
        }
    }
}

fn align4(v: usize) -> usize {
    v.saturating_add(3) & !3
}

/// Everything the generated device tree describes that is not fixed by the
/// [`layout`].
///
/// # Example
/// ```
/// use smolvm::arch::aarch64::{fdt, layout, regs};
/// use smolvm::devices::virtio::mmio::MmioAllocator;
/// let mut virtio = MmioAllocator::aarch64();
/// virtio.allocate().unwrap();
/// let mpidrs: Vec<u64> = (0..2).map(regs::vcpu_mpidr).collect();
/// let config = fdt::DeviceTreeConfig {
///     mpidrs: &mpidrs,
///     memory: &[(layout::RAM_START, 256 << 20)],
///     cmdline: "console=ttyS0",
///     initrd: Some((0x8f00_0000, 0x10_0000)),
///     virtio: virtio.slots(),
/// };
/// let blob = fdt::create_fdt(&config)?;
/// let root = fdt::parse(&blob)?;
/// assert!(root.find("/cpus/cpu@1").is_some());
/// # Ok::<(), fdt::FdtError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DeviceTreeConfig<'a> {
    /// One entry per vCPU, in vCPU order: its `MPIDR_EL1` (only the affinity bits are used).
    pub mpidrs: &'a [u64],
    /// Guest RAM ranges `(address, size)`.
    pub memory: &'a [(u64, u64)],
    /// The kernel command line (`/chosen/bootargs`).
    pub cmdline: &'a str,
    /// The initrd `(address, size)`, if any.
    pub initrd: Option<(u64, u64)>,
    /// The virtio-mmio devices, from the same allocation the transports use. `irq` is the SPI
    /// number counted from 0.
    pub virtio: &'a [MmioSlot],
}

/// The GIC's phandle (the only node others refer to).
pub const GIC_PHANDLE: u32 = 1;

/// The `/uart@...` node name: the console path `/chosen/stdout-path` names.
///
/// # Example
/// ```
/// assert_eq!(smolvm::arch::aarch64::fdt::uart_node_name(), "uart@b000000");
/// ```
pub fn uart_node_name() -> String {
    format!("uart@{:x}", layout::UART_START)
}

/// Generates the device tree for an arm64 Linux guest on the smolvm platform:
///
/// - `/` — `compatible "linux,dummy-virt"`, 2 address and 2 size cells, `interrupt-parent`
///   = the GIC;
/// - `/cpus/cpu@<affinity>` — `arm,arm-v8`, `enable-method "psci"`, `reg` = MPIDR affinity;
/// - `/memory@<base>` — the RAM ranges;
/// - `/chosen` — `bootargs`, `linux,initrd-start`/`-end` (when there is an initrd),
///   `stdout-path` = the UART;
/// - `/intc@<dist>` — `arm,gic-v3`: distributor and redistributor ranges, three interrupt
///   cells, the maintenance PPI, `phandle` [`GIC_PHANDLE`];
/// - `/timer` — `arm,armv8-timer`, PPIs 13, 14, 11, 10, level-high, `always-on`;
/// - `/uart@<base>` — `ns16550a`, 1-byte registers (`reg-shift 0`, `reg-io-width 1`), its SPI
///   rising-edge, `clock-frequency`;
/// - `/virtio_mmio@<addr>` per slot — `virtio,mmio`, `dma-coherent`, `<GIC_SPI irq EDGE>`;
/// - `/psci` — `arm,psci-0.2` with the `hvc` conduit (PSCI is handled by KVM).
///
/// Device interrupts are rising-edge: smolvm's devices raise [`InterruptLine`] pulses
/// (irqfd writes or a raise-lower pair), which a level-sensitive configuration could lose
/// when the line drops before the CPU takes the interrupt; an edge latches pending in the
/// GIC. The timer PPIs are level-sensitive (the virtual timer is a level source; GICv3 has
/// no polarity, so level-high as QEMU and Firecracker describe it).
///
/// [`InterruptLine`]: crate::devices::InterruptLine
///
/// # Errors
/// [`FdtError::Unbalanced`] for no vCPU; [`FdtError::InvalidString`] for a command line with
/// a NUL; [`FdtError::TooLarge`] beyond [`FDT_MAX_SIZE`](layout::FDT_MAX_SIZE).
///
/// # Example
/// See [`DeviceTreeConfig`].
pub fn create_fdt(config: &DeviceTreeConfig<'_>) -> Result<Vec<u8>> {
    if config.mpidrs.is_empty() {
        return Err(FdtError::Unbalanced("a device tree needs at least one CPU"));
    }
    let mut w = FdtWriter::new();
    w.set_boot_cpuid((config.mpidrs[0] & 0xff_ffff) as u32);
    w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", "smolvm")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", GIC_PHANDLE)?;

    w.begin_node("cpus")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 0)?;
    for &mpidr in config.mpidrs {
        let affinity = mpidr & MPIDR_AFFINITY_MASK;
        w.begin_node(&format!("cpu@{affinity:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,arm-v8")?;
        w.property_string("enable-method", "psci")?;
        w.property_u64("reg", affinity)?;
        w.end_node()?;
    }
    w.end_node()?;

    if let Some(&(base, _)) = config.memory.first() {
        w.begin_node(&format!("memory@{base:x}"))?;
        w.property_string("device_type", "memory")?;
        let reg: Vec<u64> = config.memory.iter().flat_map(|&(a, s)| [a, s]).collect();
        w.property_u64s("reg", &reg)?;
        w.end_node()?;
    }

    let uart = uart_node_name();
    w.begin_node("chosen")?;
    w.property_string("bootargs", config.cmdline)?;
    if let Some((start, size)) = config.initrd {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", start.saturating_add(size))?;
    }
    w.property_string("stdout-path", &format!("/{uart}"))?;
    w.end_node()?;

    let (redist, redist_size) = layout::gic_redist_range(config.mpidrs.len() as u32);
    w.begin_node(&format!("intc@{:x}", layout::GIC_DIST_START))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    // Address cells for child nodes (a GIC ITS later) and for `interrupt-map` users; dtc
    // warns about an interrupt provider without them.
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_null("ranges")?;
    w.property_u64s(
        "reg",
        &[
            layout::GIC_DIST_START,
            layout::GIC_DIST_SIZE,
            redist,
            redist_size,
        ],
    )?;
    w.property_cells(
        "interrupts",
        &[gic::PPI, layout::PPI_GIC_MAINTENANCE, gic::LEVEL_HIGH],
    )?;
    w.property_u32("phandle", GIC_PHANDLE)?;
    w.end_node()?;

    w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    let timer: Vec<u32> = layout::PPI_TIMER
        .iter()
        .flat_map(|&ppi| [gic::PPI, ppi, gic::LEVEL_HIGH])
        .collect();
    w.property_cells("interrupts", &timer)?;
    w.property_null("always-on")?;
    w.end_node()?;

    w.begin_node(&uart)?;
    w.property_string("compatible", "ns16550a")?;
    w.property_u64s("reg", &[layout::UART_START, layout::UART_SIZE])?;
    w.property_cells(
        "interrupts",
        &[gic::SPI, layout::UART_SPI, gic::EDGE_RISING],
    )?;
    w.property_u32("clock-frequency", layout::UART_CLOCK_HZ)?;
    w.property_u32("reg-shift", 0)?;
    w.property_u32("reg-io-width", 1)?;
    w.end_node()?;

    for slot in config.virtio {
        w.begin_node(&format!("virtio_mmio@{:x}", slot.addr))?;
        w.property_string("compatible", "virtio,mmio")?;
        w.property_u64s("reg", &[slot.addr, slot.len])?;
        w.property_cells("interrupts", &[gic::SPI, slot.irq, gic::EDGE_RISING])?;
        w.property_null("dma-coherent")?;
        w.end_node()?;
    }

    w.begin_node("psci")?;
    w.property_string("compatible", "arm,psci-0.2")?;
    w.property_string("method", "hvc")?;
    w.end_node()?;

    w.end_node()?;
    let blob = w.finish()?;
    if blob.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(FdtError::TooLarge {
            size: blob.len(),
            limit: layout::FDT_MAX_SIZE as usize,
        });
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::regs::vcpu_mpidr;
    use crate::devices::virtio::mmio::MmioAllocator;

    fn sample(vcpus: u32, devices: usize, initrd: Option<(u64, u64)>) -> FdtNode {
        let mpidrs: Vec<u64> = (0..vcpus).map(vcpu_mpidr).collect();
        let mut a = MmioAllocator::aarch64();
        for _ in 0..devices {
            a.allocate().unwrap();
        }
        let blob = create_fdt(&DeviceTreeConfig {
            mpidrs: &mpidrs,
            memory: &[(layout::RAM_START, 512 << 20)],
            cmdline: "console=ttyS0 earlycon=uart,mmio,0xb000000 quiet",
            initrd,
            virtio: a.slots(),
        })
        .unwrap();
        parse(&blob).unwrap()
    }

    #[test]
    fn writer_round_trips_through_the_parser() {
        let mut w = FdtWriter::new();
        w.begin_node("").unwrap();
        w.property_u32("a", 0x1234_5678).unwrap();
        w.property_u64("b", 0x1_0000_0002).unwrap();
        w.property_strings("c", &["x", "yz"]).unwrap();
        w.property_null("d").unwrap();
        w.property("odd", &[1, 2, 3]).unwrap();
        w.begin_node("child@1").unwrap();
        w.property_u32("a", 7).unwrap(); // a reused name string
        w.begin_node("grandchild").unwrap();
        w.end_node().unwrap();
        w.end_node().unwrap();
        w.end_node().unwrap();
        let blob = w.finish().unwrap();
        assert_eq!(&blob[..4], &FDT_MAGIC.to_be_bytes());
        assert_eq!(be32(&blob, 4, "t").unwrap() as usize, blob.len());
        assert_eq!(be32(&blob, 20, "t").unwrap(), 17);
        let root = parse(&blob).unwrap();
        assert_eq!(root.name, "");
        assert_eq!(root.cells("a"), Some(vec![0x1234_5678]));
        assert_eq!(root.u64s("b"), Some(vec![0x1_0000_0002]));
        assert_eq!(root.strings("c"), Some(vec!["x", "yz"]));
        assert_eq!(root.property("d"), Some(&[][..]));
        assert_eq!(root.property("odd"), Some(&[1, 2, 3][..]));
        assert_eq!(root.cells("odd"), None);
        let child = root.find("/child@1").unwrap();
        assert_eq!(child.cells("a"), Some(vec![7]));
        assert!(root.find("/child@1/grandchild").is_some());
        // The name "a" is stored once.
        let strings_len = be32(&blob, 32, "t").unwrap();
        assert_eq!(strings_len as usize, "a\0b\0c\0d\0odd\0".len());
    }

    #[test]
    fn writer_rejects_misuse() {
        let mut w = FdtWriter::new();
        assert!(matches!(
            w.property_u32("x", 1),
            Err(FdtError::Unbalanced(_))
        ));
        assert!(matches!(
            w.begin_node("named-root"),
            Err(FdtError::InvalidName(_))
        ));
        w.begin_node("").unwrap();
        assert!(matches!(w.begin_node(""), Err(FdtError::InvalidName(_))));
        assert!(matches!(w.begin_node("a/b"), Err(FdtError::InvalidName(_))));
        assert!(matches!(w.property("", &[]), Err(FdtError::InvalidName(_))));
        assert!(matches!(
            w.property_string("s", "a\0b"),
            Err(FdtError::InvalidString(_))
        ));
        let open = FdtWriter {
            depth: 1,
            ..Default::default()
        };
        assert!(matches!(open.finish(), Err(FdtError::Unbalanced(_))));
        assert!(matches!(
            FdtWriter::new().finish(),
            Err(FdtError::Unbalanced(_))
        ));
        w.end_node().unwrap();
        assert!(matches!(w.end_node(), Err(FdtError::Unbalanced(_))));
        assert!(matches!(w.begin_node(""), Err(FdtError::Unbalanced(_))));
    }

    #[test]
    fn parser_rejects_malformed_blobs_without_panicking() {
        let good = {
            let mut w = FdtWriter::new();
            w.begin_node("").unwrap();
            w.property_string("s", "value").unwrap();
            w.begin_node("n").unwrap();
            w.end_node().unwrap();
            w.end_node().unwrap();
            w.finish().unwrap()
        };
        assert!(matches!(parse(&[]), Err(FdtError::Truncated { .. })));
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(parse(&bad), Err(FdtError::BadMagic(_))));
        // Every truncation and every single-byte corruption is an error or a tree, never a
        // panic.
        for len in 0..good.len() {
            assert!(parse(&good[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..good.len() {
            for v in [0x00, 0x01, 0x03, 0x09, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = parse(&b);
            }
        }
    }

    #[test]
    fn generated_tree_has_the_platform_nodes() {
        let root = sample(1, 0, None);
        assert_eq!(root.string("compatible"), Some("linux,dummy-virt"));
        assert_eq!(root.cells("#address-cells"), Some(vec![2]));
        assert_eq!(root.cells("#size-cells"), Some(vec![2]));
        assert_eq!(root.cells("interrupt-parent"), Some(vec![GIC_PHANDLE]));

        let psci = root.find("/psci").unwrap();
        assert_eq!(psci.string("compatible"), Some("arm,psci-0.2"));
        assert_eq!(psci.string("method"), Some("hvc"));

        let mem = root.find("/memory@80000000").unwrap();
        assert_eq!(mem.string("device_type"), Some("memory"));
        assert_eq!(mem.u64s("reg"), Some(vec![0x8000_0000, 512 << 20]));

        let timer = root.find("/timer").unwrap();
        assert_eq!(timer.string("compatible"), Some("arm,armv8-timer"));
        assert!(timer.property("always-on").is_some());
        assert_eq!(
            timer.cells("interrupts"),
            Some(vec![1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4])
        );
    }

    #[test]
    fn gic_node_describes_distributor_and_redistributors() {
        let root = sample(3, 0, None);
        let gic = root.find("/intc@8000000").unwrap();
        assert_eq!(gic.string("compatible"), Some("arm,gic-v3"));
        assert_eq!(gic.cells("#interrupt-cells"), Some(vec![3]));
        assert!(gic.property("interrupt-controller").is_some());
        assert_eq!(gic.cells("#address-cells"), Some(vec![2]));
        assert_eq!(gic.property("ranges"), Some(&[][..]));
        assert_eq!(gic.cells("phandle"), Some(vec![GIC_PHANDLE]));
        assert_eq!(
            gic.u64s("reg"),
            Some(vec![
                layout::GIC_DIST_START,
                layout::GIC_DIST_SIZE,
                layout::GIC_REDIST_START,
                3 * layout::GIC_REDIST_SIZE_PER_VCPU
            ])
        );
        assert_eq!(gic.cells("interrupts"), Some(vec![1, 9, 4]));
    }

    #[test]
    fn cpus_carry_their_mpidr_and_psci() {
        let root = sample(18, 0, None);
        let cpus = root.find("/cpus").unwrap();
        assert_eq!(cpus.cells("#address-cells"), Some(vec![2]));
        assert_eq!(cpus.cells("#size-cells"), Some(vec![0]));
        assert_eq!(cpus.children.len(), 18);
        for (i, cpu) in cpus.children.iter().enumerate() {
            let aff = vcpu_mpidr(i as u32) & MPIDR_AFFINITY_MASK;
            assert_eq!(cpu.name, format!("cpu@{aff:x}"));
            assert_eq!(cpu.u64s("reg"), Some(vec![aff]));
            assert_eq!(cpu.string("device_type"), Some("cpu"));
            assert_eq!(cpu.string("compatible"), Some("arm,arm-v8"));
            assert_eq!(cpu.string("enable-method"), Some("psci"));
        }
        assert!(
            root.find("/cpus/cpu@101").is_some(),
            "vCPU 17: Aff1 1, Aff0 1"
        );
    }

    #[test]
    fn chosen_has_bootargs_initrd_and_console() {
        let root = sample(1, 0, Some((0x9f00_0000, 0x1234)));
        let chosen = root.find("/chosen").unwrap();
        assert_eq!(
            chosen.string("bootargs"),
            Some("console=ttyS0 earlycon=uart,mmio,0xb000000 quiet")
        );
        assert_eq!(chosen.u64s("linux,initrd-start"), Some(vec![0x9f00_0000]));
        assert_eq!(chosen.u64s("linux,initrd-end"), Some(vec![0x9f00_1234]));
        assert_eq!(chosen.string("stdout-path"), Some("/uart@b000000"));
        let no_initrd = sample(1, 0, None);
        assert!(no_initrd
            .find("/chosen")
            .unwrap()
            .property("linux,initrd-start")
            .is_none());
    }

    #[test]
    fn uart_is_an_mmio_16550_on_its_spi() {
        let root = sample(1, 0, None);
        let uart = root.find("/uart@b000000").unwrap();
        assert_eq!(uart.string("compatible"), Some("ns16550a"));
        assert_eq!(
            uart.u64s("reg"),
            Some(vec![layout::UART_START, layout::UART_SIZE])
        );
        assert_eq!(uart.cells("interrupts"), Some(vec![0, layout::UART_SPI, 1]));
        assert_eq!(uart.cells("clock-frequency"), Some(vec![1_843_200]));
        assert_eq!(uart.cells("reg-shift"), Some(vec![0]));
        assert_eq!(uart.cells("reg-io-width"), Some(vec![1]));
    }

    #[test]
    fn one_virtio_node_per_slot_with_its_spi() {
        let root = sample(2, 3, None);
        let nodes: Vec<&FdtNode> = root
            .children
            .iter()
            .filter(|n| n.name.starts_with("virtio_mmio@"))
            .collect();
        assert_eq!(nodes.len(), 3);
        let mut a = MmioAllocator::aarch64();
        for node in nodes {
            let slot = a.allocate().unwrap();
            assert_eq!(node.name, format!("virtio_mmio@{:x}", slot.addr));
            assert_eq!(node.string("compatible"), Some("virtio,mmio"));
            assert_eq!(node.u64s("reg"), Some(vec![slot.addr, slot.len]));
            // <GIC_SPI n IRQ_TYPE_EDGE_RISING>, n = the slot's SPI number (INTID - 32).
            assert_eq!(node.cells("interrupts"), Some(vec![0, slot.irq, 1]));
            assert!(node.property("dma-coherent").is_some());
        }
    }

    #[test]
    fn tree_without_cpus_or_with_a_nul_cmdline_is_an_error() {
        let err = create_fdt(&DeviceTreeConfig {
            mpidrs: &[],
            memory: &[],
            cmdline: "",
            initrd: None,
            virtio: &[],
        });
        assert!(matches!(err, Err(FdtError::Unbalanced(_))));
        let err = create_fdt(&DeviceTreeConfig {
            mpidrs: &[vcpu_mpidr(0)],
            memory: &[],
            cmdline: "a\0b",
            initrd: None,
            virtio: &[],
        });
        assert!(matches!(err, Err(FdtError::InvalidString(_))));
    }
}

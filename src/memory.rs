//! Guest memory: anonymous host mappings (vm-memory) laid out by the guest architecture.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest physical memory as the VMM and devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors creating guest memory.
///
/// # Example
/// ```
/// use smolvm::memory::{create, MemoryError};
/// use vm_memory::GuestAddress;
/// let overlapping = [(GuestAddress(0), 0x1000), (GuestAddress(0), 0x1000)];
/// match create(&overlapping) {
///     Err(MemoryError::Map { size, .. }) => assert_eq!(size, 0x2000),
///     Ok(_) => panic!("overlapping regions were accepted"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping (usually `ulimit -v` or memory overcommit settings).
    #[error("cannot map {size} bytes of guest memory: {source}; check `ulimit -v` and vm.overcommit_memory")]
    Map {
        /// Requested size in bytes.
        size: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Allocates guest memory for `regions` (guest address, size). The host pages are reserved
/// lazily (`MAP_NORESERVE`): untouched guest memory costs no host RAM.
///
/// # Example
/// ```
/// use vm_memory::GuestAddress;
/// let mem = smolvm::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// assert_eq!(vm_memory::GuestMemoryBackend::num_regions(&mem), 1);
/// ```
pub fn create(regions: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_ranges(regions).map_err(|e| MemoryError::Map {
        size: regions.iter().map(|r| r.1 as u64).sum(),
        source: e,
    })
}

//! Kernel image loading: vmlinux ELF (64-bit entry, or PVH 32-bit entry when the ELF carries
//! the Xen PVH note) and bzImage.
//!
//! The headers are validated here first, so that a bad image gets a precise error instead of
//! one of linux-loader's generic ones; the segments themselves are then streamed from the
//! file straight into guest memory by linux-loader (one `read` per segment, no staging copy).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

#[cfg(target_arch = "x86_64")]
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
#[cfg(target_arch = "x86_64")]
use vm_memory::{ByteValued, GuestAddress};

use super::{low_ram_end, BootError};
use crate::arch::x86_64::layout::HIMEM_START;
use crate::memory::GuestMemory;

/// Which boot protocol the loaded kernel uses.
///
/// # Example
/// ```
/// use smolvm::boot::KernelFormat;
/// /// The register that carries the boot parameters' address at entry.
/// fn boot_params_register(format: KernelFormat) -> &'static str {
///     match format {
///         KernelFormat::Elf | KernelFormat::BzImage => "rsi (zero page)",
///         KernelFormat::ElfPvh => "rbx (start_info)",
///     }
/// }
/// assert_eq!(boot_params_register(KernelFormat::ElfPvh), "rbx (start_info)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// vmlinux ELF entered in 64-bit mode through the Linux boot protocol (zero page in RSI).
    Elf,
    /// vmlinux ELF entered in 32-bit protected mode through its PVH note (start_info in EBX).
    ElfPvh,
    /// bzImage entered at its 64-bit entry (load address + 0x200) with the zero page in RSI.
    BzImage,
}

/// Where the kernel landed in guest memory and how to enter it.
///
/// # Example
/// ```no_run
/// use smolvm::boot::{load_kernel, KernelFormat};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 128 << 20)])?;
/// let kernel = load_kernel(&mem, "vmlinux".as_ref())?;
/// println!("{:?} kernel: entry {:#x}, ends at {:#x}", kernel.format, kernel.entry, kernel.end);
/// assert_eq!(kernel.format == KernelFormat::BzImage, !kernel.setup_header.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Boot protocol.
    pub format: KernelFormat,
    /// Guest physical entry point (the PVH entry for [`KernelFormat::ElfPvh`]).
    pub entry: u64,
    /// First guest address past the loaded image.
    pub end: u64,
    /// The bzImage setup header (`struct setup_header`, raw bytes from offset 0x1f1), which
    /// the zero page must carry; empty for ELF kernels.
    pub setup_header: Vec<u8>,
}

/// ELF identification and the x86_64 machine number.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Note type carrying the 32-bit PVH entry point (Xen's `XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Notes larger than this are not the PVH note and are not read.
const MAX_NOTE_SEGMENT: u64 = 1 << 20;

/// Offset of the bzImage setup header and of its `HdrS` magic.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_OFFSET: usize = 0x202;
/// Bytes of a bzImage up to and including `loadflags` (offset 0x211), which the header checks
/// read.
const BZIMAGE_MIN_HEADER: usize = 0x212;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
#[cfg(target_arch = "x86_64")]
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;

/// Loads the kernel at `path` into `mem`, detecting the format.
///
/// ELF kernels are loaded at their physical addresses (which must be at or above 1 MiB, so
/// the boot structures below stay intact); bzImages at 1 MiB. Guest memory is assumed to be
/// fresh (zeroed), so ELF `.bss` is not cleared here.
///
/// # Errors
/// [`BootError::KernelFile`] if the file cannot be read, [`BootError::KernelFormat`] if it
/// is neither an x86_64 vmlinux nor a 64-bit-capable bzImage, [`BootError::MemoryTooSmall`]
/// if it does not fit below the MMIO gap.
///
/// # Example
/// ```
/// use smolvm::boot::{load_kernel, BootError};
/// let mem = smolvm::memory::create(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
/// let err = load_kernel(&mem, "/nonexistent/vmlinux".as_ref()).unwrap_err();
/// assert!(matches!(err, BootError::KernelFile { .. }));
/// ```
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let file_err = |source: io::Error| BootError::KernelFile {
        path: path.to_path_buf(),
        source,
    };
    let format_err = |detail: String| BootError::KernelFormat {
        path: path.to_path_buf(),
        detail,
    };

    let mut file = File::open(path).map_err(file_err)?;
    let file_len = file.metadata().map_err(file_err)?.len();
    let mut head = [0u8; 0x400];
    let head_len = read_full(&mut file, &mut head).map_err(file_err)?;
    let head = &head[..head_len];

    let image = if head.starts_with(&ELF_MAGIC) {
        let elf = check_elf(&mut file, head, file_len).map_err(format_err)?;
        check_fits(mem, elf.lowest, elf.end)?;
        Image::Elf(elf)
    } else if head.len() >= HDRS_OFFSET + 4 && &head[HDRS_OFFSET..HDRS_OFFSET + 4] == b"HdrS" {
        let bz = check_bzimage(head, file_len).map_err(format_err)?;
        check_fits(mem, HIMEM_START, bz.end)?;
        Image::BzImage(bz)
    } else if head.len() < HDRS_OFFSET + 4 {
        return Err(format_err(format!(
            "file too short ({file_len} bytes) and no ELF magic"
        )));
    } else {
        return Err(format_err(
            "no ELF magic and no bzImage HdrS magic at offset 0x202".into(),
        ));
    };

    load_image(mem, &mut file, path, image)
}

/// Puts a validated image into guest memory with linux-loader, whose ELF and bzImage loaders
/// exist only when it is built for x86.
#[cfg(target_arch = "x86_64")]
fn load_image(
    mem: &GuestMemory,
    file: &mut File,
    path: &Path,
    image: Image,
) -> Result<LoadedKernel, BootError> {
    let map_loader = |e: linux_loader::loader::Error| map_loader_error(path, mem, e);
    match image {
        Image::Elf(elf) => {
            let res =
                Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(map_loader)?;
            let (format, entry) = match elf.pvh_entry {
                Some(pvh) => (KernelFormat::ElfPvh, pvh),
                None => (KernelFormat::Elf, elf.entry),
            };
            log::debug!("loaded ELF kernel {path:?}: {format:?} entry {entry:#x}");
            Ok(LoadedKernel {
                format,
                entry,
                end: res.kernel_end.max(elf.end),
                setup_header: Vec::new(),
            })
        }
        Image::BzImage(bz) => {
            let res: KernelLoaderResult = BzImage::load(
                mem,
                Some(GuestAddress(HIMEM_START)),
                file,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(map_loader)?;
            let setup_header =
                res.setup_header
                    .map(|h| h.as_slice().to_vec())
                    .ok_or_else(|| BootError::KernelFormat {
                        path: path.to_path_buf(),
                        detail: "bzImage without a setup header".into(),
                    })?;
            log::debug!("loaded bzImage {path:?} at {HIMEM_START:#x}");
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                entry: HIMEM_START + BZIMAGE_ENTRY_64_OFFSET,
                end: res.kernel_end.max(bz.end),
                setup_header,
            })
        }
    }
}

/// The x86_64 kernel formats are only loaded on x86_64 hosts (a guest runs on the host's
/// architecture); elsewhere a recognised image is reported rather than loaded.
#[cfg(not(target_arch = "x86_64"))]
fn load_image(
    _mem: &GuestMemory,
    _file: &mut File,
    path: &Path,
    image: Image,
) -> Result<LoadedKernel, BootError> {
    let found = match image {
        Image::Elf(ElfInfo {
            pvh_entry: Some(entry),
            ..
        }) => format!("x86_64 vmlinux with PVH entry {entry:#x}"),
        Image::Elf(ElfInfo { entry, .. }) => format!("x86_64 vmlinux with entry {entry:#x}"),
        Image::BzImage(BzInfo { end }) => format!("x86_64 bzImage loading up to {end:#x}"),
    };
    Err(BootError::KernelFormat {
        path: path.to_path_buf(),
        detail: format!("{found}; x86_64 kernels are only loaded on x86_64 hosts"),
    })
}

/// A validated image, before loading.
enum Image {
    Elf(ElfInfo),
    BzImage(BzInfo),
}

/// What the ELF headers say.
struct ElfInfo {
    entry: u64,
    pvh_entry: Option<u64>,
    /// Lowest physical load address and end of the highest segment (memsz included).
    lowest: u64,
    end: u64,
}

/// What the bzImage setup header says.
struct BzInfo {
    /// End of the memory the kernel needs from its load address: the loaded payload, or
    /// `init_size` (the in-place decompression footprint) when the header has one.
    end: u64,
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}

/// Validates the ELF header and program headers, and finds the PVH note.
fn check_elf(file: &mut File, head: &[u8], file_len: u64) -> Result<ElfInfo, String> {
    if head.len() < ELF64_EHDR_SIZE {
        return Err(format!("truncated ELF header ({} bytes)", head.len()));
    }
    match head[4] {
        ELFCLASS64 => {}
        ELFCLASS32 => return Err("32-bit ELF; a 64-bit x86_64 vmlinux is needed".into()),
        c => return Err(format!("invalid ELF class {c}")),
    }
    if head[5] != ELFDATA2LSB {
        return Err("big-endian ELF".into());
    }
    let machine = le16(head, 18);
    if machine != EM_X86_64 {
        return Err(format!(
            "ELF for another architecture (e_machine {machine}, x86_64 is {EM_X86_64})"
        ));
    }
    let entry = le64(head, 24);
    let phoff = le64(head, 32);
    let phentsize = le16(head, 54);
    let phnum = le16(head, 56);
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(format!("unexpected program header size {phentsize}"));
    }
    if phnum == 0 {
        return Err("ELF has no program headers".into());
    }
    let ph_bytes = u64::from(phnum) * ELF64_PHDR_SIZE as u64;
    if phoff < ELF64_EHDR_SIZE as u64 || phoff.checked_add(ph_bytes).is_none_or(|e| e > file_len) {
        return Err("truncated ELF: program headers past the end of the file".into());
    }
    let mut phdrs = vec![0u8; ph_bytes as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| format!("cannot read program headers: {e}"))?;

    let mut lowest = u64::MAX;
    let mut end = 0u64;
    let mut pvh_entry = None;
    for (i, ph) in phdrs.chunks_exact(ELF64_PHDR_SIZE).enumerate() {
        let p_type = le32(ph, 0);
        let offset = le64(ph, 8);
        let paddr = le64(ph, 24);
        let filesz = le64(ph, 32);
        let memsz = le64(ph, 40);
        if offset.checked_add(filesz).is_none_or(|e| e > file_len) {
            return Err(format!(
                "truncated ELF: segment {i} extends past the end of the file"
            ));
        }
        match p_type {
            PT_LOAD if filesz > 0 => {
                if paddr < HIMEM_START {
                    return Err(format!(
                        "segment {i} loads at {paddr:#x}, below 1 MiB where the boot tables live"
                    ));
                }
                let seg_end = paddr
                    .checked_add(memsz.max(filesz))
                    .ok_or_else(|| format!("segment {i} address overflows"))?;
                lowest = lowest.min(paddr);
                end = end.max(seg_end);
            }
            PT_NOTE if pvh_entry.is_none() && filesz <= MAX_NOTE_SEGMENT => {
                let mut notes = vec![0u8; filesz as usize];
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(&mut notes))
                    .map_err(|e| format!("cannot read ELF notes: {e}"))?;
                pvh_entry = find_pvh_entry(&notes)?;
            }
            _ => {}
        }
    }
    if end == 0 {
        return Err("ELF has no loadable segment".into());
    }
    let entry_point = pvh_entry.unwrap_or(entry);
    if entry_point < lowest || entry_point >= end {
        return Err(format!(
            "entry point {entry_point:#x} is outside the loaded segments [{lowest:#x}, {end:#x})"
        ));
    }
    Ok(ElfInfo {
        entry,
        pvh_entry,
        lowest,
        end,
    })
}

/// Scans an ELF note segment for the Xen PVH 32-bit entry point (`"Xen"` note of type
/// `XEN_ELFNOTE_PHYS32_ENTRY`; Linux stores it as a 64-bit value, the low 32 bits count).
fn find_pvh_entry(notes: &[u8]) -> Result<Option<u64>, String> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = le32(notes, pos) as usize;
        let descsz = le32(notes, pos + 4) as usize;
        let n_type = le32(notes, pos + 8);
        let name_at = pos + 12;
        let desc_at = name_at.saturating_add(align4(namesz));
        let next = desc_at.saturating_add(align4(descsz));
        if next > notes.len() {
            break;
        }
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY && &notes[name_at..name_at + namesz] == b"Xen\0" {
            if descsz < 4 {
                return Err("invalid PVH note (entry shorter than 4 bytes)".into());
            }
            return Ok(Some(u64::from(le32(notes, desc_at))));
        }
        pos = next;
    }
    Ok(None)
}

/// Validates the bzImage setup header (everything linux-loader would reject, with reasons).
fn check_bzimage(head: &[u8], file_len: u64) -> Result<BzInfo, String> {
    // Everything up to `loadflags`, the last field read unconditionally (a file can end right
    // after the magic).
    if head.len() < BZIMAGE_MIN_HEADER {
        return Err(format!(
            "truncated bzImage setup header ({} bytes, at least {BZIMAGE_MIN_HEADER:#x} needed)",
            head.len()
        ));
    }
    let hdr = &head[SETUP_HEADER_OFFSET..];
    let version = le16(head, 0x206);
    let loadflags = head[0x211];
    if version < 0x200 {
        return Err(format!(
            "bzImage boot protocol {version:#x} is older than 2.00"
        ));
    }
    if loadflags & 1 == 0 {
        return Err("zImage (not loaded high); only bzImage is supported".into());
    }
    if version >= 0x20c && head.len() >= 0x238 {
        let xloadflags = le16(head, 0x236);
        if xloadflags & 1 == 0 {
            return Err("bzImage has no 64-bit entry point (32-bit kernel)".into());
        }
    }
    let setup_sects = match hdr[0] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    if file_len <= setup_size {
        return Err(format!(
            "truncated bzImage: {file_len} bytes, setup alone is {setup_size}"
        ));
    }
    let payload_end = HIMEM_START + (file_len - setup_size);
    // init_size (protocol 2.10+) is the memory the kernel needs to decompress in place.
    let init_end = if version >= 0x20a && head.len() >= 0x264 {
        HIMEM_START + u64::from(le32(head, 0x260))
    } else {
        0
    };
    Ok(BzInfo {
        end: payload_end.max(init_end),
    })
}

/// Checks that `[start, end)` lies in the RAM below the MMIO gap.
fn check_fits(mem: &GuestMemory, start: u64, end: u64) -> Result<(), BootError> {
    let ram_end = low_ram_end(mem);
    if end > ram_end {
        return Err(BootError::MemoryTooSmall {
            what: "kernel",
            needed: end - start,
            available: ram_end.saturating_sub(start),
        });
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
/// Maps a linux-loader error to a typed one (the headers were checked before, so these
/// mostly mean I/O errors or a file that changed underneath).
fn map_loader_error(path: &Path, mem: &GuestMemory, e: linux_loader::loader::Error) -> BootError {
    use linux_loader::loader::{bzimage, elf, Error as E};
    match e {
        E::MemoryOverflow => BootError::MemoryTooSmall {
            what: "kernel",
            needed: u64::MAX,
            available: low_ram_end(mem),
        },
        E::Elf(elf::Error::ReadKernelImage)
        | E::Bzimage(bzimage::Error::ReadBzImageCompressedKernel) => BootError::KernelFile {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
        },
        other => BootError::KernelFormat {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use vm_memory::GuestAddress;

    /// A unique temporary file with `data`, removed on drop.
    pub(crate) struct TempFile(pub PathBuf);

    impl TempFile {
        pub(crate) fn new(tag: &str, data: &[u8]) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "smolvm-boot-{}-{}-{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, data).unwrap();
            TempFile(p)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub(crate) fn mem(size: usize) -> GuestMemory {
        crate::memory::create(&[(GuestAddress(0), size)]).unwrap()
    }

    /// Builds an x86_64 ELF: one PT_LOAD of `code` at `paddr`, optional PT_NOTE with `notes`.
    pub(crate) fn make_elf(paddr: u64, entry: u64, code: &[u8], notes: Option<&[u8]>) -> Vec<u8> {
        let phnum: u16 = if notes.is_some() { 2 } else { 1 };
        let data_off = 64 + 56 * u64::from(phnum);
        let mut v = Vec::new();
        v.extend_from_slice(&ELF_MAGIC);
        v.extend_from_slice(&[ELFCLASS64, ELFDATA2LSB, 1, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&2u16.to_le_bytes()); // e_type EXEC
        v.extend_from_slice(&EM_X86_64.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // e_version
        v.extend_from_slice(&entry.to_le_bytes());
        v.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        v.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v.extend_from_slice(&56u16.to_le_bytes());
        v.extend_from_slice(&phnum.to_le_bytes());
        v.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        assert_eq!(v.len(), 64);
        let phdr = |v: &mut Vec<u8>, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            v.extend_from_slice(&ty.to_le_bytes());
            v.extend_from_slice(&5u32.to_le_bytes()); // R+X
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&addr.to_le_bytes()); // vaddr
            v.extend_from_slice(&addr.to_le_bytes()); // paddr
            v.extend_from_slice(&filesz.to_le_bytes());
            v.extend_from_slice(&memsz.to_le_bytes());
            v.extend_from_slice(&0x1000u64.to_le_bytes());
        };
        let code_len = code.len() as u64;
        phdr(
            &mut v,
            PT_LOAD,
            data_off,
            paddr,
            code_len,
            code_len + 0x1000,
        );
        if let Some(n) = notes {
            phdr(
                &mut v,
                PT_NOTE,
                data_off + code_len,
                0,
                n.len() as u64,
                n.len() as u64,
            );
        }
        v.extend_from_slice(code);
        if let Some(n) = notes {
            v.extend_from_slice(n);
        }
        v
    }

    /// An ELF note with 4-byte aligned name and descriptor.
    pub(crate) fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v.extend_from_slice(desc);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    /// A minimal bzImage: boot sector + 1 setup sector with `HdrS`, then `payload`.
    pub(crate) fn make_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 2 * 512];
        v[SETUP_HEADER_OFFSET] = 1; // setup_sects
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version 2.15
        v[0x211] = 1; // LOADED_HIGH
        v[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        v[0x230..0x234].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // kernel_alignment
        v[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        v.extend_from_slice(payload);
        v
    }

    fn load(data: &[u8], mem_size: usize) -> (Result<LoadedKernel, BootError>, GuestMemory) {
        let f = TempFile::new("kernel", data);
        let m = mem(mem_size);
        (load_kernel(&m, &f.0), m)
    }

    fn format_detail(r: Result<LoadedKernel, BootError>) -> String {
        match r {
            Err(BootError::KernelFormat { detail, .. }) => detail,
            other => panic!("expected KernelFormat, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_is_kernel_file_error() {
        let m = mem(16 << 20);
        let e = load_kernel(&m, Path::new("/nonexistent/smolvm/vmlinux")).unwrap_err();
        assert!(matches!(e, BootError::KernelFile { .. }), "{e:?}");
    }

    #[test]
    fn text_file_is_format_error() {
        let d = format_detail(load(b"hello, I am not a kernel\n", 16 << 20).0);
        assert!(d.contains("too short"), "{d}");
        let d = format_detail(load(&[b'x'; 4096], 16 << 20).0);
        assert!(d.contains("HdrS"), "{d}");
    }

    #[test]
    fn truncated_elf_is_format_error() {
        let elf = make_elf(0x100000, 0x100000, &[0x90; 64], None);
        let d = format_detail(load(&elf[..40], 16 << 20).0);
        assert!(d.contains("truncated ELF header"), "{d}");
        let d = format_detail(load(&elf[..100], 16 << 20).0);
        assert!(d.contains("program headers"), "{d}");
        let d = format_detail(load(&elf[..elf.len() - 1], 16 << 20).0);
        assert!(d.contains("past the end"), "{d}");
    }

    #[test]
    fn foreign_elf_is_format_error() {
        let mut elf = make_elf(0x100000, 0x100000, &[0x90; 64], None);
        elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        let d = format_detail(load(&elf, 16 << 20).0);
        assert!(d.contains("another architecture"), "{d}");
        let mut elf32 = make_elf(0x100000, 0x100000, &[0x90; 64], None);
        elf32[4] = ELFCLASS32;
        let d = format_detail(load(&elf32, 16 << 20).0);
        assert!(d.contains("32-bit ELF"), "{d}");
    }

    #[test]
    fn elf_below_1mib_is_rejected() {
        let elf = make_elf(0x8000, 0x8000, &[0x90; 64], None);
        let d = format_detail(load(&elf, 16 << 20).0);
        assert!(d.contains("below 1 MiB"), "{d}");
    }

    #[test]
    #[cfg(target_arch = "x86_64")] // linux-loader loads x86 images on x86 only
    fn loads_tiny_elf() {
        use vm_memory::Bytes;
        let code: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let elf = make_elf(0x200000, 0x200010, &code, None);
        let (r, m) = load(&elf, 16 << 20);
        let k = r.unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, 0x200010);
        assert_eq!(k.end, 0x200000 + 3000 + 0x1000);
        assert!(k.setup_header.is_empty());
        let mut back = vec![0u8; code.len()];
        m.read_slice(&mut back, GuestAddress(0x200000)).unwrap();
        assert_eq!(back, code);
    }

    #[test]
    #[cfg(target_arch = "x86_64")] // linux-loader loads x86 images on x86 only
    fn loads_pvh_elf() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0040u64.to_le_bytes(),
        ));
        let elf = make_elf(0x100_0000, 0x100_0200, &[0xf4; 512], Some(&notes));
        let k = load(&elf, 32 << 20).0.unwrap();
        assert_eq!(k.format, KernelFormat::ElfPvh);
        assert_eq!(k.entry, 0x100_0040);
    }

    #[test]
    fn short_pvh_note_is_format_error() {
        let notes = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2]);
        let elf = make_elf(0x100_0000, 0x100_0000, &[0xf4; 512], Some(&notes));
        let d = format_detail(load(&elf, 32 << 20).0);
        assert!(d.contains("PVH"), "{d}");
    }

    #[test]
    fn kernel_too_big_for_memory() {
        let elf = make_elf(0x100_0000, 0x100_0000, &[0x90; 64], None);
        let e = load(&elf, 8 << 20).0.unwrap_err();
        assert!(
            matches!(e, BootError::MemoryTooSmall { what: "kernel", .. }),
            "{e:?}"
        );
        let bz = make_bzimage(&vec![0xab; 2 << 20]);
        let e = load(&bz, 2 << 20).0.unwrap_err();
        assert!(
            matches!(e, BootError::MemoryTooSmall { what: "kernel", .. }),
            "{e:?}"
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")] // linux-loader loads x86 images on x86 only
    fn loads_fake_bzimage() {
        use vm_memory::Bytes;
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let bz = make_bzimage(&payload);
        let (r, m) = load(&bz, 16 << 20);
        let k = r.unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert_eq!(k.end, HIMEM_START + payload.len() as u64);
        assert_eq!(k.setup_header.len(), 0x26c - 0x1f1);
        assert_eq!(&k.setup_header[HDRS_OFFSET - 0x1f1..][..4], b"HdrS");
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn bzimage_cut_after_the_magic_is_format_error() {
        // Found by fuzz/kernel_loader: the header checks read past a short file's end.
        let bz = make_bzimage(&[0; 64]);
        for len in [HDRS_OFFSET + 4, HDRS_OFFSET + 5, BZIMAGE_MIN_HEADER - 1] {
            let d = format_detail(load(&bz[..len], 16 << 20).0);
            assert!(d.contains("truncated bzImage setup header"), "{len}: {d}");
        }
    }

    #[test]
    fn old_or_32bit_bzimage_is_rejected() {
        let mut bz = make_bzimage(&[0; 64]);
        bz[0x236] = 0;
        assert!(format_detail(load(&bz, 16 << 20).0).contains("64-bit"));
        let mut bz = make_bzimage(&[0; 64]);
        bz[0x211] = 0;
        assert!(format_detail(load(&bz, 16 << 20).0).contains("zImage"));
        let bz = make_bzimage(&[]);
        assert!(format_detail(load(&bz, 16 << 20).0).contains("truncated"));
    }
}

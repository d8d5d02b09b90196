//! Guest block requests — reads, writes, discards, write-zeroes, flushes, at any offset and
//! length, including past the end and overflowing `u64` — against a copy-on-write overlay
//! (`devices::virtio::block::disk::DiskImage` in `DiskMode::Overlay`) over a small base
//! image, and against a plain `Vec<u8>` model of the disk.
//!
//! The input is a 3-byte header and then 8-byte records:
//!
//! | bytes | meaning |
//! |---|---|
//! | header 0-1 | base size: `1 + (u16 LE % 1024)` sectors (512 B to 512 KiB, so the last 4 KiB overlay block is often short and the bitmap spans several words) |
//! | header 2 | bit 0: overlay in a scratch file (else in memory) |
//! | record 0 | `% 5`: 0 read, 1 write, 2 discard, 3 write-zeroes, 4 flush |
//! | record 1-3 | offset (24-bit LE); taken `% (size + 1)` unless record 7 bit 7 |
//! | record 4-5 | length (16-bit LE) |
//! | record 6 | data seed for writes |
//! | record 7 | bit 7: offset is `u64::MAX - offset` (overflow); bit 6: offset rounded down to 4 KiB; bit 5: length rounded down to 4 KiB |
//!
//! Checks: nothing panics; a request is rejected with `DiskError::OutOfRange` exactly when
//! `offset + len` overflows or passes the end of the disk, and succeeds otherwise; every read
//! (and a full read at the end) returns what the model holds; the base image is unchanged.
//!
//! The base images live in unlinked temporary files (one per size, at most 16 kept open,
//! reopened through `/proc/self/fd`), so the fuzzer leaves nothing behind; Linux only, like
//! the other targets. A scratch overlay file is unlinked as soon as it is open, too.

#![no_main]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use smolvm::devices::virtio::block::disk::{
    Disk, DiskError, DiskImage, DiskMode, OverlayTarget, OVERLAY_BLOCK_SIZE, SECTOR_SIZE,
};

/// Byte `i` of every base image.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(29) ^ (i >> 12).wrapping_mul(97)) as u8 | 1
}

/// Largest base image: 1024 sectors.
const MAX_SIZE: u64 = 1024 * SECTOR_SIZE;

/// The first `MAX_SIZE` bytes of every base image; a base of `n` bytes holds the first `n`.
fn content() -> &'static [u8] {
    static CONTENT: OnceLock<Vec<u8>> = OnceLock::new();
    CONTENT.get_or_init(|| (0..MAX_SIZE).map(pattern).collect())
}

/// Base images by size: the unlinked file (kept open) and its `/proc/self/fd` path. At most
/// `MAX_BASES` are kept, so memory and descriptors stay bounded.
static BASES: Mutex<Option<HashMap<u64, (File, PathBuf)>>> = Mutex::new(None);
const MAX_BASES: usize = 16;

/// Runs `f` on the base image of `size` bytes, creating it on first use.
fn with_base<R>(size: u64, f: impl FnOnce(&File, &Path) -> R) -> R {
    let mut bases = BASES.lock().unwrap();
    let bases = bases.get_or_insert_with(HashMap::new);
    if bases.len() >= MAX_BASES && !bases.contains_key(&size) {
        bases.clear();
    }
    let (file, path) = bases.entry(size).or_insert_with(|| {
        let tmp = std::env::temp_dir().join(format!(
            "smolvm-fuzz-disk-{}-{size}.img",
            std::process::id()
        ));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .unwrap();
        f.write_all(&content()[..size as usize]).unwrap();
        std::fs::remove_file(&tmp).unwrap();
        let path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        (f, path)
    });
    f(file, path)
}

fn scratch_overlay_path() -> PathBuf {
    std::env::temp_dir().join(format!("smolvm-fuzz-disk-{}.overlay", std::process::id()))
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let size = (1 + u64::from(u16::from_le_bytes([input[0], input[1]])) % 1024) * SECTOR_SIZE;
    let target = if input[2] & 1 != 0 {
        OverlayTarget::scratch_file(scratch_overlay_path())
    } else {
        OverlayTarget::Memory
    };
    let mut disk = with_base(size, |_, path| {
        DiskImage::open(path, DiskMode::Overlay(target))
    })
    .unwrap();
    let mut model = content()[..size as usize].to_vec();
    assert_eq!(disk.size(), size);
    assert!(!disk.is_read_only());
    let mut buf = vec![0u8; 1 << 16];

    for rec in input[3..].chunks_exact(8) {
        let raw_off = u64::from(u32::from_le_bytes([rec[1], rec[2], rec[3], 0]));
        let mut off = if rec[7] & 0x80 != 0 {
            u64::MAX - raw_off
        } else {
            raw_off % (size + 1)
        };
        if rec[7] & 0x40 != 0 {
            off -= off % OVERLAY_BLOCK_SIZE;
        }
        let mut len = u64::from(u16::from_le_bytes([rec[4], rec[5]]));
        if rec[7] & 0x20 != 0 {
            len -= len % OVERLAY_BLOCK_SIZE;
        }
        let in_range = off.checked_add(len).is_some_and(|end| end <= size);
        // Where the request lands in the model; used only when it is in range.
        let range = if in_range {
            off as usize..(off + len) as usize
        } else {
            0..0
        };
        let result = match rec[0] % 5 {
            0 => {
                let r = disk.read_at(off, &mut buf[..len as usize]);
                if r.is_ok() {
                    assert!(buf[..len as usize] == model[range], "read {len} at {off}");
                }
                r
            }
            1 => {
                for (i, b) in buf[..len as usize].iter_mut().enumerate() {
                    *b = rec[6].wrapping_add((i as u8).wrapping_mul(7)) ^ (i >> 8) as u8;
                }
                let r = disk.write_at(off, &buf[..len as usize]);
                if r.is_ok() {
                    model[range].copy_from_slice(&buf[..len as usize]);
                }
                r
            }
            op @ (2 | 3) => {
                let r = if op == 2 {
                    disk.discard(off, len)
                } else {
                    disk.write_zeroes(off, len)
                };
                if r.is_ok() {
                    model[range].fill(0);
                }
                r
            }
            _ => {
                disk.flush().unwrap();
                continue;
            }
        };
        match result {
            Ok(()) => assert!(
                in_range,
                "accepted {len} bytes at {off} on a {size}-byte disk"
            ),
            Err(DiskError::OutOfRange {
                offset,
                len: l,
                size: s,
            }) => {
                assert!(
                    !in_range,
                    "rejected {len} bytes at {off} on a {size}-byte disk"
                );
                assert_eq!((offset, l, s), (off, len, size));
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    let mut all = vec![0u8; size as usize];
    disk.read_at(0, &mut all).unwrap();
    assert!(all == model, "final content differs from the model");
    assert!(disk.overlay_blocks().unwrap() <= size.div_ceil(OVERLAY_BLOCK_SIZE));
    drop(disk);

    with_base(size, |base, _| base.read_exact_at(&mut all, 0)).unwrap();
    assert!(all == content()[..size as usize], "base changed");
});

//! Builds the purpose-built tiny test guests in `guest/tiny/` (see its README.md) at test time.
//!
//! Include it from an integration test or bench with
//!
//! ```ignore
//! #[path = "common/guests.rs"]   // or "../tests/common/guests.rs" from benches/
//! mod guests;
//! ```
//!
//! and call [`guest`]`("hello")` to get the path of the built ELF. Guests are assembled with
//! `gcc` (as the driver for `as` + `ld`) into a cache directory (`CARGO_TARGET_TMPDIR` when the
//! including crate is an integration test or bench, else the system temp dir), keyed by a hash
//! of every source file in `guest/tiny/`, the flags and the compiler version, so editing a
//! guest rebuilds it and nothing else ever does. A build takes a few tens of milliseconds.
//!
//! Self-contained on purpose: std only, no external crates.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Every guest in `guest/tiny/`, by the name [`guest`] takes.
pub const GUESTS: &[&str] = &[
    "hello",
    "hello_min",
    "hello_pvh",
    "poweroff",
    "halt",
    "triple_fault",
    "smp",
    "irq",
    "spin",
    "virtio_blk",
    "virtio_net",
    "virtio_vsock",
];

/// The 32-bit port the guests report events to (APIC ids, IRQ acks, heartbeats).
pub const TEST_PORT: u16 = 0x510;

/// Serial output of each guest when it behaves (for `assert!(serial.contains(..))`).
pub const HELLO_OUTPUT: &str = "Hello from smolvm!\n";
pub const HELLO_PVH_OUTPUT: &str = "Hello from PVH!\npvh magic ok\n";
pub const POWEROFF_OUTPUT: &str = "powering off\n";
pub const HALT_OUTPUT: &str = "halting\n";
pub const TRIPLE_FAULT_OUTPUT: &str = "faulting\n";
pub const IRQ_READY_OUTPUT: &str = "irq ready\n";
pub const IRQ_OK_OUTPUT: &str = "irq ok\n";
pub const SPIN_OUTPUT: &str = "spinning\n";
/// What `virtio_blk` prints when its write, read-back and comparison all succeeded.
pub const VIRTIO_BLK_OK_OUTPUT: &str = "virtio-blk ok\n";
/// What `virtio_blk` prints when a request failed or the data read back differs.
pub const VIRTIO_BLK_FAILED_OUTPUT: &str = "virtio-blk failed\n";
/// What `virtio_blk` prints when no virtio-blk device answers at its MMIO slot.
pub const VIRTIO_BLK_NO_DEVICE_OUTPUT: &str = "virtio-blk: no device\n";
/// What `virtio_blk` prints when a request's used-ring interrupt never came (~5 s).
pub const VIRTIO_BLK_NO_IRQ_OUTPUT: &str = "virtio-blk: no interrupt\n";
/// The MMIO slot, GSI and vector the `virtio_blk` guest drives.
pub const VIRTIO_BLK_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_BLK_GSI: u32 = 5;
pub const VIRTIO_BLK_VECTOR: u32 = 0x41;
/// The sector `virtio_blk` writes and reads back.
pub const VIRTIO_BLK_SECTOR: u64 = 1;
/// Test-port values `virtio_blk` reports: `| status` of the write, `| status` of the read,
/// `| 0` (data equal) or `| 1` (differs) for the comparison.
pub const VIRTIO_BLK_WRITE_STATUS: u32 = 0x100;
pub const VIRTIO_BLK_READ_STATUS: u32 = 0x200;
pub const VIRTIO_BLK_COMPARE: u32 = 0x300;

/// The 512 bytes `virtio_blk` writes to [`VIRTIO_BLK_SECTOR`]: byte `i` is `(i * 7 + 3) & 0xff`.
pub fn virtio_blk_pattern() -> Vec<u8> {
    (0..512u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// Every guest's IDT handlers print this (followed by the decimal vector) before resetting.
pub const EXCEPTION_PREFIX: &str = "exception ";
/// The GSI and vector the `irq` guest programs into the IOAPIC.
pub const IRQ_GSI: u32 = 10;
pub const IRQ_VECTOR: u32 = 0x40;

/// What `smp` prints when all `n` processors listed in the MP table checked in.
pub fn smp_output(n: usize) -> String {
    format!("all {n} cpus up\n")
}

/// Flags for every guest (the C ones only matter for `.c` guests; none exist yet).
const FLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-fno-pic",
    "-ffreestanding",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mno-sse",
    "-O2",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
];

/// The compiler driver: `$SMOLVM_GUEST_CC` if set, else `gcc`.
fn cc() -> String {
    std::env::var("SMOLVM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string())
}

/// Where the guest sources live: `$SMOLVM_TINY_GUEST_DIR` if set, else
/// `<crate>/guest/tiny`.
pub fn source_dir() -> PathBuf {
    match std::env::var_os("SMOLVM_TINY_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("guest")
            .join("tiny"),
    }
}

fn cache_dir() -> PathBuf {
    let base = match option_env!("CARGO_TARGET_TMPDIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir(),
    };
    base.join("smolvm-tiny-guests")
}

/// The compiler's `--version` text, or why it cannot build the guests. Checked once per process.
fn toolchain() -> Result<&'static str, String> {
    static TOOLCHAIN: OnceLock<Result<String, String>> = OnceLock::new();
    TOOLCHAIN
        .get_or_init(|| {
            if !cfg!(target_arch = "x86_64") {
                return Err("the tiny test guests are x86_64 code; this host is not x86_64".into());
            }
            let cc = cc();
            match Command::new(&cc).arg("--version").output() {
                Ok(out) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                }
                Ok(out) => Err(format!(
                    "`{cc} --version` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => Err(format!(
                    "cannot run `{cc}` ({e}); the tiny test guests need gcc and binutils \
                     (e.g. `apt-get install gcc`), or set SMOLVM_GUEST_CC"
                )),
            }
        })
        .as_ref()
        .map(|s| s.as_str())
        .map_err(|e| e.clone())
}

/// `Ok(())` when gcc can build the guests on this host, else a reason to print when skipping.
pub fn available() -> Result<(), String> {
    toolchain().map(|_| ())
}

/// FNV-1a, 64 bit: a stable hash with no dependencies, for cache keys.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Length-prefix every field so that ("ab","c") and ("a","bc") differ.
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Builds (or finds in the cache) the guest `name` and returns its ELF path, or an error
/// that includes the compiler's stderr.
pub fn try_guest(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("invalid tiny guest name {name:?}"));
    }
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // One build at a time per process; other processes are handled by the atomic rename.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(name) {
        return Ok(p.clone());
    }
    let version = toolchain()?;
    let dir = source_dir();
    let source = ["S", "c"]
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "no tiny guest {name:?}: neither {name}.S nor {name}.c in {}",
                dir.display()
            )
        })?;
    let script = dir.join("link.ld");

    // Key: guest name, flags, compiler version and every source file in the directory
    // (guests #include shared files, so any edit there rebuilds all of them).
    let mut h = Fnv::new();
    h.write(name.as_bytes());
    for f in FLAGS {
        h.write(f.as_bytes());
    }
    h.write(version.as_bytes());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e != "md"))
        .collect();
    files.sort();
    for f in &files {
        h.write(f.file_name().unwrap().to_string_lossy().as_bytes());
        h.write(&std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?);
    }

    let out_dir = cache_dir();
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let out = out_dir.join(format!("{name}-{:016x}.elf", h.0));
    if !out.is_file() {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = out_dir.join(format!(
            "{name}-{:016x}.{}.{}.tmp",
            h.0,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(cc());
        cmd.args(FLAGS)
            .arg(format!("-Wl,-T,{}", script.display()))
            .arg("-I")
            .arg(&dir)
            .arg("-o")
            .arg(&tmp)
            .arg(&source);
        let result = cmd
            .output()
            .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        if !result.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "building tiny guest {name:?} failed ({}):\n{cmd:?}\n{}",
                result.status,
                String::from_utf8_lossy(&result.stderr)
            ));
        }
        std::fs::rename(&tmp, &out)
            .map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), out.display()))?;
    }
    built.insert(name.to_string(), out.clone());
    Ok(out)
}

/// Builds (or finds in the cache) the guest `name` and returns its ELF path.
///
/// Panics with the reason (missing toolchain, or gcc's stderr) if it cannot; tests that must
/// run where gcc may be missing should check [`available`] first and skip with its message.
pub fn guest(name: &str) -> PathBuf {
    match try_guest(name) {
        Ok(p) => p,
        Err(e) => panic!("tiny test guest {name:?} unavailable: {e}"),
    }
}

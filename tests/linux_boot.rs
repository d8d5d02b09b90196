//! Boots a REAL Linux kernel through the public API: Debian 12's generic amd64 kernel (or the
//! one `$SMOLVM_LINUX_KERNEL` names), with an initramfs built here whose init prints a line
//! and reboots.
//!
//! - Host: an unmodified Linux kernel cannot run on a software hypervisor such as `kvm_pvm`
//!   (it emulates guest kernel mode and stops at the first `cmpxchg16b`); there, and where
//!   `/dev/kvm` is missing, every test prints `SKIPPED: <test>: <reason>` to stderr (past the
//!   harness's output capture, so it shows in a plain `cargo test`) and returns.
//!   With `SMOLVM_REQUIRE_KVM` set, a missing or unusable `/dev/kvm` fails instead.
//! - Kernel: `$SMOLVM_LINUX_KERNEL` (a bzImage), else `guest/linux/fetch-kernel.sh`
//!   (downloads Debian's package once and caches it). The vmlinux ELF for the PVH test is
//!   `$SMOLVM_LINUX_VMLINUX`, else a `vmlinux` next to the bzImage (the script extracts one).
//!   On a host that can run Linux, having no kernel is a failure that says how to provide one.
//! - Initramfs: `guest/linux/init.c` compiled with `gcc -static -O2`, packed into a cpio
//!   "newc" archive written by [`initramfs::archive`] (no cpio tool, no checked-in binary).
//!
//! Boots are serialised (one Linux at a time keeps the timings meaningful and the watchdog
//! honest on small CI machines), and each has a watchdog of [`WATCHDOG`]. The time from
//! `start()` to init's first line is printed as data, not asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use smolvm::boot::KernelCmdline;
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder};

/// Longest a boot may take before the test stops the VM and fails.
const WATCHDOG: Duration = Duration::from_secs(30);
/// Guest memory: Debian's generic kernel wants ~60 MiB to decompress and ~100 MiB to boot
/// comfortably; host memory is only used as the guest touches it.
const MEMORY_MIB: u64 = 512;
/// The first line init prints.
const INIT_HELLO: &str = "smolvm-init: hello";
/// The prefix of init's CPU count line (`smolvm-init: cpus=N (online LIST)`).
const INIT_CPUS: &str = "smolvm-init: cpus=";
/// Where the host notes explain why a software hypervisor cannot run Linux.
const HOST_NOTES: &str = "../shared/notes/host-kvm.md";

/// Like `eprintln!`, but written straight to the process's stderr, which the test harness
/// does not capture: skips and timings show in a plain `cargo test` run, not only with
/// `--nocapture`.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// One Linux boot at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Host check
// ---------------------------------------------------------------------------------------------

/// Whether this host can boot an unmodified Linux guest. When it cannot, prints
/// `SKIPPED: <reason>` to stderr and returns false, so a skip is never silent.
fn host_can_run_linux(test: &str) -> bool {
    let require_kvm = std::env::var_os("SMOLVM_REQUIRE_KVM").is_some();
    let reason = if !Path::new("/dev/kvm").exists() {
        if require_kvm {
            panic!("{test}: SMOLVM_REQUIRE_KVM is set but /dev/kvm does not exist");
        }
        "/dev/kvm does not exist (no KVM on this host)".to_string()
    } else {
        match smolvm::hypervisor::open() {
            Err(e) => {
                if require_kvm {
                    panic!("{test}: SMOLVM_REQUIRE_KVM is set but /dev/kvm is unusable: {e}");
                }
                format!("/dev/kvm cannot be used: {e}")
            }
            Ok(hv) if hv.capabilities().software_virtualization => format!(
                "kvm_pvm software hypervisor cannot run an unmodified Linux kernel \
                 (see {HOST_NOTES})"
            ),
            Ok(_) => return true,
        }
    };
    note!("SKIPPED: {test}: {reason}");
    false
}

// ---------------------------------------------------------------------------------------------
// Kernel and initramfs
// ---------------------------------------------------------------------------------------------

/// The kernels to boot.
#[derive(Debug, Clone)]
struct Kernels {
    bzimage: PathBuf,
    /// The uncompressed ELF, if one is available (`None` with the reason otherwise).
    vmlinux: Result<PathBuf, String>,
}

const HOW_TO_PROVIDE: &str = "set SMOLVM_LINUX_KERNEL=/path/to/bzImage (an x86_64 kernel with \
     the 8250 serial console and initramfs support built in, e.g. a Debian or Ubuntu \
     /boot/vmlinuz-*; SMOLVM_LINUX_VMLINUX may name its vmlinux ELF), or make \
     guest/linux/fetch-kernel.sh work (a Debian host with apt access to deb.debian.org)";

/// The kernels, found or fetched once per test process. Fails the test (on a host that can
/// run Linux) if there is none, saying how to provide one.
fn kernels() -> Kernels {
    static KERNELS: OnceLock<Result<Kernels, String>> = OnceLock::new();
    KERNELS
        .get_or_init(find_kernels)
        .clone()
        .unwrap_or_else(|e| {
            panic!("no Linux kernel to boot: {e}\nTo provide one: {HOW_TO_PROVIDE}")
        })
}

fn find_kernels() -> Result<Kernels, String> {
    let bzimage = match std::env::var_os("SMOLVM_LINUX_KERNEL") {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(format!("SMOLVM_LINUX_KERNEL={} is not a file", p.display()));
            }
            p
        }
        None => fetch_kernel()?,
    };
    let vmlinux = match std::env::var_os("SMOLVM_LINUX_VMLINUX") {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        Some(p) => Err(format!(
            "SMOLVM_LINUX_VMLINUX={} is not a file",
            Path::new(&p).display()
        )),
        None => {
            let sibling = bzimage.with_file_name("vmlinux");
            if sibling.is_file() {
                Ok(sibling)
            } else {
                Err(format!(
                    "no vmlinux ELF next to {} (fetch-kernel.sh could not extract one; set \
                     SMOLVM_LINUX_VMLINUX to test the ELF/PVH entry)",
                    bzimage.display()
                ))
            }
        }
    };
    note!("linux_boot: bzImage {}", bzimage.display());
    if let Ok(v) = &vmlinux {
        note!("linux_boot: vmlinux {}", v.display());
    }
    Ok(Kernels { bzimage, vmlinux })
}

/// Runs `guest/linux/fetch-kernel.sh`; its last stdout line is the bzImage path.
fn fetch_kernel() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/linux/fetch-kernel.sh");
    note!(
        "linux_boot: SMOLVM_LINUX_KERNEL not set; running {}",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    if path.is_empty() || !Path::new(path).is_file() {
        return Err(format!(
            "{} printed no kernel path (stdout: {stdout:?})",
            script.display()
        ));
    }
    Ok(PathBuf::from(path))
}

/// The initramfs with the test init, built once per test process.
fn initramfs() -> PathBuf {
    static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INITRAMFS
        .get_or_init(build_initramfs)
        .clone()
        .unwrap_or_else(|e| panic!("cannot build the test initramfs: {e}"))
}

fn build_initramfs() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux_boot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/linux/init.c");
    // Per-process names, then rename: concurrent test processes never see half a file.
    let pid = std::process::id();
    let init = dir.join(format!("init.{pid}"));
    let cc = std::env::var("SMOLVM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let out = Command::new(&cc)
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&init)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run `{cc}` (install gcc and libc6-dev): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cc} -static -O2 {}` failed (static libc needed: install libc6-dev):\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let binary = std::fs::read(&init).map_err(|e| format!("read {}: {e}", init.display()))?;
    let _ = std::fs::remove_file(&init);
    let tmp = dir.join(format!("initramfs.cpio.{pid}"));
    let path = dir.join("initramfs.cpio");
    std::fs::write(&tmp, initramfs::archive(&binary))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

/// A cpio "newc" (SVR4, no CRC) archive writer, as the kernel's initramfs unpacker reads it.
mod initramfs {
    pub const S_IFDIR: u32 = 0o040_000;
    pub const S_IFCHR: u32 = 0o020_000;
    pub const S_IFREG: u32 = 0o100_000;

    /// The test initramfs: `/dev`, `/dev/console` (char 5:1), `/sys`, `/init` = `init`.
    pub fn archive(init: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        entry(&mut a, 1, "dev", S_IFDIR | 0o755, (0, 0), &[]);
        entry(&mut a, 2, "dev/console", S_IFCHR | 0o600, (5, 1), &[]);
        entry(&mut a, 3, "sys", S_IFDIR | 0o555, (0, 0), &[]);
        entry(&mut a, 4, "init", S_IFREG | 0o755, (0, 0), init);
        entry(&mut a, 0, "TRAILER!!!", 0, (0, 0), &[]);
        a
    }

    /// Appends one entry: the 110-byte ASCII header (magic `070701`, 13 eight-digit hex
    /// fields), the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes.
    pub fn entry(a: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("cpio entry larger than 4 GiB"),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (newc has no CRC)
        ];
        a.extend_from_slice(b"070701");
        for f in fields {
            a.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        a.extend_from_slice(name.as_bytes());
        a.push(0);
        pad4(a);
        a.extend_from_slice(data);
        pad4(a);
    }

    fn pad4(a: &mut Vec<u8>) {
        a.resize(a.len().next_multiple_of(4), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Booting
// ---------------------------------------------------------------------------------------------

/// What one boot produced.
struct Boot {
    exit: ExitReason,
    console: String,
    /// From just before `start()` to the moment init's first line was complete.
    to_init: Option<Duration>,
    total: Duration,
}

impl Boot {
    /// The last `n` console lines, for failure messages.
    fn tail(&self, n: usize) -> String {
        last_lines(&self.console, n)
    }

    fn assert_console_has(&self, needle: &str) {
        assert!(
            self.console.contains(needle),
            "console has no {needle:?} (exit: {}); last console lines:\n{}",
            self.exit,
            self.tail(60)
        );
    }

    fn assert_reset(&self) {
        assert_eq!(
            self.exit,
            ExitReason::Reset,
            "expected a reset, got `{}`; last console lines:\n{}",
            self.exit,
            self.tail(60)
        );
    }

    /// The N of init's `smolvm-init: cpus=N` line.
    fn init_cpus(&self) -> Option<u32> {
        let rest = &self.console[self.console.find(INIT_CPUS)? + INIT_CPUS.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }
}

/// The last `n` lines of `console`, or a note that there was no output at all.
fn last_lines(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().collect();
    if lines.is_empty() {
        return "(no console output at all)".to_string();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots `kernel` and waits for it to end, with the watchdog; reports the timing on stderr.
fn boot(
    test: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: KernelCmdline,
    vcpus: u32,
    irqchip: IrqchipMode,
) -> Boot {
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let to_init = Arc::new(Mutex::new(None::<Duration>));
    let t0 = Instant::now();
    let mut b = VmBuilder::new()
        .memory_mib(MEMORY_MIB)
        .vcpus(vcpus)
        .irqchip(irqchip)
        .kernel(kernel)
        .cmdline(cmdline.clone());
    if let Some(i) = initrd {
        b = b.initrd(i);
    }
    let (sink, seen) = (console.clone(), to_init.clone());
    let b = b.console_callback(move |bytes| {
        let mut c = sink.lock().unwrap();
        c.extend_from_slice(bytes);
        // Only the bytes that could complete the line need looking at: O(1) per call.
        let window = &c[c.len().saturating_sub(INIT_HELLO.len() + bytes.len())..];
        if window
            .windows(INIT_HELLO.len())
            .any(|w| w == INIT_HELLO.as_bytes())
        {
            seen.lock().unwrap().get_or_insert_with(|| t0.elapsed());
        }
    });
    let vm = b.start().unwrap_or_else(|e| {
        panic!("{test}: start {} failed: {e}", kernel.display());
    });
    let exit = match vm.wait_timeout(WATCHDOG) {
        Some(r) => r,
        None => {
            let stopped = vm.stop();
            let text = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
            panic!(
                "{test}: watchdog: Linux still running after {WATCHDOG:?} (stopped: {stopped}); \
                 cmdline `{cmdline}`; last console lines:\n{}",
                last_lines(&text, 60)
            );
        }
    };
    let total = t0.elapsed();
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let to_init = *to_init.lock().unwrap();
    match to_init {
        Some(t) => note!(
            "linux_boot: {test}: start() -> `{INIT_HELLO}` in {:.1} ms; exit `{exit}` after \
             {:.1} ms ({} console bytes)",
            t.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            console.len()
        ),
        None => note!(
            "linux_boot: {test}: exit `{exit}` after {:.1} ms ({} console bytes, init line not \
             seen)",
            total.as_secs_f64() * 1e3,
            console.len()
        ),
    }
    Boot {
        exit,
        console,
        to_init,
        total,
    }
}

/// The default fast-boot command line with printk raised to info, so the boot log shows,
/// and the early serial console on, so a boot that dies before the 8250 driver registers
/// its console (which replays the log) still shows how far it got.
fn verbose_cmdline() -> KernelCmdline {
    KernelCmdline::default()
        .without("quiet")
        .with("loglevel", "7")
        .with("earlyprintk", "serial,ttyS0")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The bzImage boots with smolvm's default (quiet, tuned) command line: init runs, prints its
/// line on the serial console, reboots, and the VM reports `Reset`.
#[test]
fn bzimage_boots_to_init_with_default_cmdline() {
    let test = "bzimage_boots_to_init_with_default_cmdline";
    if !host_can_run_linux(test) {
        return;
    }
    let (k, initrd) = (kernels(), initramfs());
    let _g = serial();
    let b = boot(
        test,
        &k.bzimage,
        Some(&initrd),
        KernelCmdline::default(),
        1,
        IrqchipMode::InKernel,
    );
    b.assert_console_has(INIT_HELLO);
    b.assert_reset();
    assert!(b.to_init.is_some_and(|t| t <= b.total));
    assert_eq!(b.init_cpus(), Some(1), "{}", b.tail(20));
}

/// The bzImage boots verbosely: the kernel's banner (`Linux version`) reaches the console
/// before init's line, and the VM still ends with `Reset`.
#[test]
fn bzimage_boots_verbose_with_kernel_banner() {
    let test = "bzimage_boots_verbose_with_kernel_banner";
    if !host_can_run_linux(test) {
        return;
    }
    let (k, initrd) = (kernels(), initramfs());
    let _g = serial();
    let b = boot(
        test,
        &k.bzimage,
        Some(&initrd),
        verbose_cmdline(),
        1,
        IrqchipMode::InKernel,
    );
    b.assert_console_has("Linux version");
    b.assert_console_has(INIT_HELLO);
    b.assert_reset();
    let banner = b.console.find("Linux version").unwrap();
    assert!(banner < b.console.find(INIT_HELLO).unwrap());
}

/// With 2 vCPUs the kernel brings up the second one (INIT/SIPI through the MP table) and
/// init sees 2 CPUs online.
#[test]
fn two_vcpus_are_online_in_linux() {
    let test = "two_vcpus_are_online_in_linux";
    if !host_can_run_linux(test) {
        return;
    }
    let (k, initrd) = (kernels(), initramfs());
    let _g = serial();
    let b = boot(
        test,
        &k.bzimage,
        Some(&initrd),
        KernelCmdline::default(),
        2,
        IrqchipMode::InKernel,
    );
    b.assert_console_has(INIT_CPUS);
    assert_eq!(
        b.init_cpus(),
        Some(2),
        "init did not see 2 CPUs; last console lines:\n{}",
        b.tail(30)
    );
    b.assert_reset();
}

/// In split-irqchip mode (LAPIC in KVM, IOAPIC emulated by smolvm, no PIC or PIT) Linux
/// boots with 2 vCPUs: its timer comes from kvm-clock and the TSC-deadline LAPIC timer, the
/// serial interrupt goes through smolvm's IOAPIC, and the VM ends with `Reset`.
#[test]
fn split_irqchip_boots_linux_with_two_vcpus() {
    let test = "split_irqchip_boots_linux_with_two_vcpus";
    if !host_can_run_linux(test) {
        return;
    }
    let (k, initrd) = (kernels(), initramfs());
    let _g = serial();
    let b = boot(
        test,
        &k.bzimage,
        Some(&initrd),
        verbose_cmdline(),
        2,
        IrqchipMode::Split,
    );
    b.assert_console_has("Linux version");
    b.assert_console_has(INIT_HELLO);
    assert_eq!(b.init_cpus(), Some(2), "{}", b.tail(30));
    b.assert_reset();
}

/// The uncompressed vmlinux ELF boots through its PVH entry (32-bit protected mode,
/// `hvm_start_info` with command line, memory map and the initrd as module): banner, init's
/// line, `Reset`. Skipped with a printed reason when no vmlinux could be extracted.
#[test]
fn vmlinux_boots_through_pvh_entry() {
    let test = "vmlinux_boots_through_pvh_entry";
    if !host_can_run_linux(test) {
        return;
    }
    let k = kernels();
    let vmlinux = match &k.vmlinux {
        Ok(v) => v.clone(),
        Err(why) => {
            note!("SKIPPED: {test}: {why}");
            return;
        }
    };
    let initrd = initramfs();
    let _g = serial();
    let b = boot(
        test,
        &vmlinux,
        Some(&initrd),
        verbose_cmdline(),
        1,
        IrqchipMode::InKernel,
    );
    b.assert_console_has("Linux version");
    b.assert_console_has(INIT_HELLO);
    b.assert_reset();
}

/// A kernel panic ends the VM instead of hanging it: with no init (`rdinit=/nonexistent`, no
/// initrd, no root device) the kernel panics, and `panic=1` reboots through the i8042 one
/// second later, which the VM reports as `Reset`.
#[test]
fn kernel_panic_resets_the_vm() {
    let test = "kernel_panic_resets_the_vm";
    if !host_can_run_linux(test) {
        return;
    }
    let k = kernels();
    let _g = serial();
    let cmdline = KernelCmdline::default().with("rdinit", "/nonexistent");
    let b = boot(test, &k.bzimage, None, cmdline, 1, IrqchipMode::InKernel);
    b.assert_console_has("Kernel panic");
    b.assert_reset();
    assert!(!b.console.contains(INIT_HELLO));
}

/// The cpio writer produces what the kernel's initramfs unpacker expects: `070701` headers
/// with 13 hex fields, 4-byte aligned names and data, the right modes and device numbers, and
/// a trailer. Runs on every host (it needs no KVM).
#[test]
fn initramfs_archive_is_well_formed_newc() {
    let init = b"\x7fELF pretend init";
    let a = initramfs::archive(init);
    let mut pos = 0;
    let mut seen = Vec::new();
    loop {
        assert_eq!(pos % 4, 0, "header at {pos} not 4-byte aligned");
        assert_eq!(&a[pos..pos + 6], b"070701", "magic at {pos}");
        let field = |i: usize| {
            let s = std::str::from_utf8(&a[pos + 6 + 8 * i..pos + 14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        let (mode, filesize, rdev, namesize) =
            (field(1), field(6), (field(9), field(10)), field(11));
        let name_at = pos + 110;
        let name = &a[name_at..name_at + namesize as usize];
        assert_eq!(name.last(), Some(&0), "name not NUL-terminated");
        let name = std::str::from_utf8(&name[..name.len() - 1])
            .unwrap()
            .to_string();
        let data_at = (name_at + namesize as usize).next_multiple_of(4);
        let data = &a[data_at..data_at + filesize as usize];
        pos = (data_at + filesize as usize).next_multiple_of(4);
        if name == "TRAILER!!!" {
            break;
        }
        match name.as_str() {
            "dev" | "sys" => assert_eq!(mode & 0o170_000, initramfs::S_IFDIR),
            "dev/console" => {
                assert_eq!(mode, initramfs::S_IFCHR | 0o600);
                assert_eq!(rdev, (5, 1));
            }
            "init" => {
                assert_eq!(mode, initramfs::S_IFREG | 0o755);
                assert_eq!(data, init);
            }
            other => panic!("unexpected entry {other:?}"),
        }
        seen.push(name);
    }
    assert_eq!(pos, a.len(), "bytes after the trailer");
    assert_eq!(seen, ["dev", "dev/console", "sys", "init"]);
}

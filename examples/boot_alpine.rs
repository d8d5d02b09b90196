//! `cargo run --example boot_alpine`: boots Alpine Linux (or the busybox fallback) in a
//! microVM and runs a command in it through the guest agent.
//!
//! ```text
//! cargo run --release --example boot_alpine [-- [--kernel PATH] [--rootfs PATH|auto]
//!     [--initrd PATH] [--cmdline STR] [--append STR] [--mem MIB] [--vcpus N]
//!     [--interactive] [--keep-overlay PATH] [--timeout SECS] [--irqchip in-kernel|split]]
//! ```
//!
//! With no arguments (the *agent flow*):
//!
//! 1. checks the host with [`smolvm::probe`] and stops with the reason and the fix where no
//!    Linux kernel can boot (no `/dev/kvm`, or a software hypervisor such as `kvm_pvm`);
//! 2. finds or builds the guest kernel (`guest/kernel/build.sh`) and the root file system
//!    (`guest/rootfs/build.sh`: Alpine's minirootfs, or a busybox image when the Alpine mirror
//!    is unreachable) in `$SMOLVM_CACHE` (default `~/.cache/smolvm`), saying what it does and
//!    how long it took;
//! 3. boots with the root file system on virtio-blk under a copy-on-write overlay in memory
//!    (the cached image is never modified; `--keep-overlay PATH` keeps the guest's writes in a
//!    file instead) and a vsock device for the agent;
//! 4. waits for the agent and prints a measured timeline: VMM set-up, first kernel console
//!    output, init, agent ready;
//! 5. runs `cat /etc/os-release` through the agent, then powers the guest off and waits for
//!    it to stop.
//!
//! `--interactive` attaches the console to the terminal instead (a shell on the console; the
//! VM powers off when it exits). `--kernel PATH` without `--rootfs` boots that kernel (and
//! `--initrd`) with the console on stdout until the guest stops: the plain flow, also used by
//! `scripts/measure-process.py` with a tiny guest. `--rootfs auto` picks the cached rootfs.
//!
//! Exit status: 0 when the guest ran and stopped normally (reset, power-off, halt), 1 when it
//! stopped otherwise or a step failed, 2 for bad arguments, a host that cannot run the guest,
//! or assets that could not be built.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smolvm::agent::Command;
use smolvm::boot::KernelCmdline;
use smolvm::devices::virtio::block::{DiskImage, DiskMode, OverlayTarget};
use smolvm::devices::virtio::vsock::VsockConfig;
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder, VmHandle};

const USAGE: &str = "usage: boot_alpine [--kernel PATH] [--rootfs PATH|auto] [--initrd PATH] \
[--cmdline STR] [--append STR] [--mem MIB] [--vcpus N] [--interactive] [--keep-overlay PATH] \
[--timeout SECS] [--irqchip in-kernel|split]

  (no arguments)     build or reuse the cached kernel and rootfs, boot, wait for the guest
                     agent, print a boot timeline, run `cat /etc/os-release`, power off
  --kernel PATH      vmlinux ELF (PVH entry used when present) or bzImage; without --rootfs
                     the guest just runs with its console on stdout until it stops
  --rootfs PATH|auto an ext4 root file system with the smolvm agent (auto: the cached build)
  --initrd PATH      initial ramdisk
  --cmdline STR      replace the kernel command line (default: smolvm's fast-boot line)
  --append STR       add arguments to the command line
  --mem MIB          guest memory in MiB (default 256 with a rootfs, else 128)
  --vcpus N          number of vCPUs (default 1)
  --interactive      console on this terminal (shell in the guest; exit it to power off)
  --keep-overlay P   keep the guest's disk writes in overlay file P (reused when it exists)
  --timeout SECS     stop the guest after SECS seconds (default: none; 120 for the agent)
  --irqchip MODE     in-kernel (default: PIC, IOAPIC, LAPIC and PIT in KVM) or split (LAPIC
                     in KVM, IOAPIC in smolvm, no PIC/PIT: ~10x faster VM teardown)

Log messages go to stderr; set SMOLVM_LOG=debug (or info, warn, error) for more.";

/// Where the rootfs comes from.
enum Rootfs {
    /// No root file system: the plain flow.
    None,
    /// The cached build (built when missing).
    Auto,
    /// The caller's image.
    Path(PathBuf),
}

struct Args {
    kernel: Option<PathBuf>,
    rootfs: Rootfs,
    initrd: Option<String>,
    cmdline: Option<String>,
    append: Vec<String>,
    mem: Option<u64>,
    vcpus: u32,
    interactive: bool,
    keep_overlay: Option<PathBuf>,
    timeout: Option<Duration>,
    irqchip: IrqchipMode,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kernel: None,
        rootfs: Rootfs::Auto,
        initrd: None,
        cmdline: None,
        append: Vec::new(),
        mem: None,
        vcpus: 1,
        interactive: false,
        keep_overlay: None,
        timeout: None,
        irqchip: IrqchipMode::InKernel,
    };
    let mut rootfs_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => args.kernel = Some(value()?.into()),
            "--rootfs" => {
                rootfs_given = true;
                args.rootfs = match value()?.as_str() {
                    "auto" => Rootfs::Auto,
                    p => Rootfs::Path(p.into()),
                }
            }
            "--initrd" => args.initrd = Some(value()?),
            "--cmdline" => args.cmdline = Some(value()?),
            "--append" => args.append.push(value()?),
            "--mem" => args.mem = Some(value()?.parse().map_err(|e| format!("--mem: {e}"))?),
            "--vcpus" => args.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--interactive" => args.interactive = true,
            "--keep-overlay" => args.keep_overlay = Some(value()?.into()),
            "--timeout" => {
                let secs: f64 = value()?.parse().map_err(|e| format!("--timeout: {e}"))?;
                args.timeout =
                    Some(Duration::try_from_secs_f64(secs).map_err(|e| format!("--timeout: {e}"))?);
            }
            "--irqchip" => {
                args.irqchip = match value()?.as_str() {
                    "in-kernel" => IrqchipMode::InKernel,
                    "split" => IrqchipMode::Split,
                    other => return Err(format!("--irqchip: {other:?} is not in-kernel or split")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // An explicit kernel without a rootfs is the plain flow.
    if args.kernel.is_some() && !rootfs_given {
        args.rootfs = Rootfs::None;
    }
    if matches!(args.rootfs, Rootfs::None) && (args.interactive || args.keep_overlay.is_some()) {
        return Err("--interactive and --keep-overlay need a rootfs (--rootfs PATH|auto)".into());
    }
    Ok(args)
}

/// Minimal stderr logger so library warnings (e.g. "software KVM") are visible.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[smolvm {}] {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let level = match std::env::var("SMOLVM_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    static LOGGER: StderrLog = StderrLog;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }

    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}\n");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if matches!(args.rootfs, Rootfs::None) {
        plain(&args)
    } else {
        agent_flow(&args)
    }
}

fn cmdline(args: &Args, extra: &[&str]) -> KernelCmdline {
    let mut cmdline = match &args.cmdline {
        Some(s) => KernelCmdline::parse(s),
        None => KernelCmdline::default(),
    };
    for a in extra {
        cmdline.append(a);
    }
    for a in &args.append {
        cmdline.append(a);
    }
    cmdline
}

fn is_normal(reason: &ExitReason) -> bool {
    matches!(
        reason,
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Halted
    )
}

/// `--kernel` without a rootfs: console on stdout until the guest stops.
fn plain(args: &Args) -> ExitCode {
    let kernel = args.kernel.as_deref().expect("plain flow has a kernel");
    let mut builder = VmBuilder::new()
        .kernel(kernel)
        .memory_mib(args.mem.unwrap_or(128))
        .vcpus(args.vcpus)
        .irqchip(args.irqchip)
        .cmdline(cmdline(args, &[]))
        .console(std::io::stdout());
    if let Some(initrd) = &args.initrd {
        builder = builder.initrd(initrd);
    }
    let vm = match builder.start() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let reason = wait(&vm, args.timeout);
    if is_normal(&reason) {
        ExitCode::SUCCESS
    } else {
        eprintln!("guest stopped: {reason}");
        ExitCode::from(1)
    }
}

fn wait(vm: &VmHandle, timeout: Option<Duration>) -> ExitReason {
    match timeout {
        Some(t) => vm.wait_timeout(t).unwrap_or_else(|| {
            eprintln!("timeout: stopping the guest after {t:?}");
            vm.stop()
        }),
        None => vm.wait(),
    }
}

/// Runs one of the guest/ build scripts, which print the output path on stdout and their
/// progress on stderr (passed through).
fn build_asset(what: &str, script: &str, arg: Option<&str>) -> Result<PathBuf, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    eprintln!("boot_alpine: {what}: running {} (cached after the first build; the kernel takes about 8 minutes on 2 cores)", path.display());
    let started = Instant::now();
    let mut cmd = Process::new("bash");
    cmd.arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", path.display(), out.status));
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let line = printed.lines().last().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(format!("{} printed no path", path.display()));
    }
    eprintln!(
        "boot_alpine: {what}: {line} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(line))
}

/// The guest kernel: `--kernel`, else the cached build (its PVH vmlinux).
fn kernel_path(args: &Args) -> Result<PathBuf, String> {
    if let Some(k) = &args.kernel {
        return Ok(k.clone());
    }
    let dir = build_asset(
        "kernel",
        "guest/kernel/build.sh",
        Some(std::env::consts::ARCH),
    )?;
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        Ok(vmlinux)
    } else {
        Err(format!("{} has no vmlinux", dir.display()))
    }
}

fn rootfs_path(args: &Args) -> Result<PathBuf, String> {
    match &args.rootfs {
        Rootfs::Path(p) => Ok(p.clone()),
        _ => build_asset(
            "rootfs",
            "guest/rootfs/build.sh",
            Some(std::env::consts::ARCH),
        ),
    }
}

/// Console bytes go to stdout; the times of the first byte and of init's first line are
/// recorded for the timeline.
#[derive(Default)]
struct ConsoleTimes {
    first_byte: Option<Instant>,
    init: Option<Instant>,
    line: Vec<u8>,
}

fn agent_flow(args: &Args) -> ExitCode {
    let report = smolvm::probe();
    if !report.can_boot_linux() {
        eprintln!(
            "error: this host cannot boot a Linux guest: {}\n(run `cargo run --example doctor` \
             for the full host report)",
            report.linux_blocker().unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    let (kernel, rootfs) = match kernel_path(args).and_then(|k| Ok((k, rootfs_path(args)?))) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let overlay = match &args.keep_overlay {
        Some(p) => OverlayTarget::persistent_file(p),
        None => OverlayTarget::Memory,
    };
    let disk = match DiskImage::open(&rootfs, DiskMode::Overlay(overlay)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {}: {e}", rootfs.display());
            return ExitCode::from(2);
        }
    };

    let times = Arc::new(Mutex::new(ConsoleTimes::default()));
    let mut extra = vec!["root=/dev/vda", "rw"];
    if args.interactive {
        extra.push("smolvm_shell=1");
    }
    let mut builder = VmBuilder::new()
        .kernel(&kernel)
        .memory_mib(args.mem.unwrap_or(256))
        .vcpus(args.vcpus)
        .irqchip(args.irqchip)
        .cmdline(cmdline(args, &extra))
        .block_device(disk)
        .vsock(VsockConfig::new(3));
    if let Some(initrd) = &args.initrd {
        builder = builder.initrd(initrd);
    }
    let sink = times.clone();
    builder = builder.console_callback(move |bytes: &[u8]| {
        let now = Instant::now();
        let mut t = sink.lock().unwrap_or_else(|e| e.into_inner());
        t.first_byte.get_or_insert(now);
        for &b in bytes {
            if b == b'\n' {
                if t.init.is_none() && t.line.starts_with(b"smolvm-init:") {
                    t.init = Some(now);
                }
                t.line.clear();
            } else if t.line.len() < 64 {
                t.line.push(b);
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    });

    let t0 = Instant::now();
    let vm = match builder.start() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let setup = t0.elapsed();

    if args.interactive {
        return interactive(&vm);
    }

    let agent_timeout = args.timeout.unwrap_or(Duration::from_secs(120));
    let ready = vm.wait_agent_ready(agent_timeout);
    let ready_at = t0.elapsed();
    let info = match ready {
        Ok(info) => info,
        Err(e) => {
            eprintln!("error: the guest agent did not answer: {e}");
            let reason = vm.stop();
            eprintln!("guest stopped: {reason}");
            return ExitCode::from(1);
        }
    };
    let (first_byte, init) = {
        let t = times.lock().unwrap_or_else(|e| e.into_inner());
        (t.first_byte, t.init)
    };
    let since = |i: Option<Instant>| {
        i.map_or("not seen".to_string(), |i| {
            format!("{:8.1} ms", (i - t0).as_secs_f64() * 1e3)
        })
    };
    eprintln!();
    eprintln!("boot timeline (from VmBuilder::start):");
    eprintln!(
        "  VMM set-up done              {:8.1} ms",
        setup.as_secs_f64() * 1e3
    );
    eprintln!("  kernel: first console output {}", since(first_byte));
    eprintln!("  init started                 {}", since(init));
    eprintln!(
        "  agent ready                  {:8.1} ms (agent {}, protocol {})",
        ready_at.as_secs_f64() * 1e3,
        info.agent_version,
        info.protocol_version
    );

    let started = Instant::now();
    match vm.exec(
        &Command::new("cat")
            .arg("/etc/os-release")
            .timeout(Duration::from_secs(10)),
    ) {
        Ok(out) => {
            eprintln!(
                "\n$ cat /etc/os-release   ({:.1} ms, {:?})",
                started.elapsed().as_secs_f64() * 1e3,
                out.status
            );
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
        }
        Err(e) => eprintln!("error: exec failed: {e}"),
    }

    // Power off from inside (the agent's connection dies with the guest, so the call's own
    // result does not matter), then wait for the VM to stop.
    let _ = vm.exec(
        &Command::new("poweroff")
            .arg("-f")
            .timeout(Duration::from_secs(5)),
    );
    let reason = vm.wait_timeout(Duration::from_secs(10)).unwrap_or_else(|| {
        eprintln!("the guest did not power off within 10 s: stopping it");
        vm.stop()
    });
    finish(reason)
}

/// Console on this terminal: stdin goes to the guest line by line until the guest stops.
fn interactive(vm: &VmHandle) -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    // The reader thread blocks in read_line; it is left behind when the guest stops.
    std::thread::spawn(move || loop {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send(line.into_bytes()).is_err() {
                    return;
                }
            }
        }
    });
    loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(50)) {
            return finish(reason);
        }
        while let Ok(bytes) = rx.try_recv() {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                match vm.send_console_input(rest) {
                    // The UART's FIFO is full: let the guest read some.
                    Ok(0) => std::thread::sleep(Duration::from_millis(5)),
                    Ok(n) => rest = &rest[n..],
                    Err(_) => return finish(vm.wait()),
                }
            }
        }
    }
}

fn finish(reason: ExitReason) -> ExitCode {
    eprintln!("guest stopped: {reason}");
    if is_normal(&reason) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

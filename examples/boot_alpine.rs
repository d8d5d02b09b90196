//! Boots a Linux kernel (or any guest smolvm can load) with the serial console on stdout.
//!
//! ```text
//! cargo run --release --example boot_alpine -- --kernel PATH [--initrd PATH]
//!     [--cmdline STR] [--append STR] [--mem MIB] [--vcpus N] [--timeout SECS]
//!     [--irqchip in-kernel|split]
//! ```
//!
//! Exits 0 when the guest resets, powers off or halts for good; otherwise prints why the VM
//! stopped and exits 1 (2 for bad arguments or a VM that could not start).

use std::process::ExitCode;
use std::time::Duration;

use smolvm::boot::KernelCmdline;
use smolvm::hypervisor::IrqchipMode;
use smolvm::{ExitReason, VmBuilder};

const USAGE: &str = "usage: boot_alpine --kernel PATH [--initrd PATH] [--cmdline STR] \
[--append STR] [--mem MIB] [--vcpus N] [--timeout SECS] [--irqchip in-kernel|split]

  --kernel PATH    vmlinux ELF (PVH entry used when present) or bzImage
  --initrd PATH    initial ramdisk
  --cmdline STR    replace the kernel command line (default: smolvm's fast-boot line)
  --append STR     add arguments to the command line
  --mem MIB        guest memory in MiB (default 128)
  --vcpus N        number of vCPUs (default 1)
  --timeout SECS   stop the guest after SECS seconds (default: no limit)
  --irqchip MODE   in-kernel (default: PIC, IOAPIC, LAPIC and PIT in KVM) or split (LAPIC in
                   KVM, IOAPIC in smolvm, no PIC/PIT: ~10x faster VM teardown)

Log messages go to stderr; set SMOLVM_LOG=debug (or info, warn, error) for more.";

struct Args {
    kernel: String,
    initrd: Option<String>,
    cmdline: Option<String>,
    append: Vec<String>,
    mem: u64,
    vcpus: u32,
    timeout: Option<Duration>,
    irqchip: IrqchipMode,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kernel: String::new(),
        initrd: None,
        cmdline: None,
        append: Vec::new(),
        mem: 128,
        vcpus: 1,
        timeout: None,
        irqchip: IrqchipMode::InKernel,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => args.kernel = value()?,
            "--initrd" => args.initrd = Some(value()?),
            "--cmdline" => args.cmdline = Some(value()?),
            "--append" => args.append.push(value()?),
            "--mem" => args.mem = value()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--vcpus" => args.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
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
    if args.kernel.is_empty() {
        return Err("--kernel is required".into());
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

    // Stop early, with the reason and the fix, where no Linux kernel can boot (a missing or
    // inaccessible /dev/kvm, or a software hypervisor such as kvm_pvm) instead of starting a
    // guest that would hang or fail deep inside the kernel. `cargo run --example doctor`
    // prints the full host report.
    let report = smolvm::probe();
    if !report.can_boot_linux() {
        eprintln!(
            "error: this host cannot boot a Linux guest: {}\n(run `cargo run --example doctor` \
             for the full host report)",
            report.linux_blocker().unwrap_or_default()
        );
        return ExitCode::from(2);
    }

    let mut cmdline = match &args.cmdline {
        Some(s) => KernelCmdline::parse(s),
        None => KernelCmdline::default(),
    };
    for a in &args.append {
        cmdline.append(a);
    }

    let mut builder = VmBuilder::new()
        .kernel(&args.kernel)
        .memory_mib(args.mem)
        .vcpus(args.vcpus)
        .irqchip(args.irqchip)
        .cmdline(cmdline)
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
    let reason = match args.timeout {
        Some(t) => vm.wait_timeout(t).unwrap_or_else(|| {
            eprintln!("timeout: stopping the guest after {t:?}");
            vm.stop()
        }),
        None => vm.wait(),
    };
    match reason {
        ExitReason::Reset | ExitReason::PowerOff | ExitReason::Halted => ExitCode::SUCCESS,
        other => {
            eprintln!("guest stopped: {other}");
            ExitCode::from(1)
        }
    }
}

//! smolvm's end-to-end runner: boots a real Linux guest (Debian's kernel, its own virtio-mmio,
//! virtio-blk, virtio-net and vsock drivers) through smolvm's public API and checks what the
//! guest and the host see. `guest/e2e/run.sh` builds the assets and runs this, either inside
//! an emulated arm64 machine (L1) or directly on a host with hardware KVM.
//!
//! ```text
//! smolvm-e2e probe
//!     prints `SKIPPED: <reason>` and exits 0 when this host cannot boot Linux, else `OK`
//! smolvm-e2e run --assets DIR --out DIR
//!     DIR holds: kernel, initrd, rw.img, ov.img, ro.img, hello.txt, and optionally
//!     rootfs.ext4 (guest/rootfs/build.sh's image: adds boot C)
//! ```
//!
//! Output, one line each: `PASS <check>`, `FAIL <check>: <why>`, `DATA <name> <value>`, then
//! `E2E-RESULT pass=N fail=M`. Exit status 1 when any check failed.
//!
//! Boots (each a fresh VM):
//! - A: 1 vCPU, three disks (read-write, in-memory overlay, read-only), a TAP-backed NIC and
//!   vsock; quiet console. The agent drives the block, network and vsock checks, then the
//!   guest powers off.
//! - B: 2 vCPUs, no devices, `loglevel=6` so the kernel's first line shows when the kernel
//!   starts; init prints the CPU count and reboots.
//! - C (only when DIR has rootfs.ext4; needs a kernel with virtio and ext4 built in, such as
//!   the microVM kernel): smolvm's root file system as the only disk (in-memory overlay),
//!   `root=/dev/vda rw`, no initrd, vsock; `cat /etc/os-release` through the agent, then
//!   `poweroff -f`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smolvm::agent::{Command, ExitStatus};
use smolvm::boot::KernelCmdline;
use smolvm::devices::virtio::block::{DiskImage, DiskMode, OverlayTarget};
use smolvm::devices::virtio::net::TapConfig;
use smolvm::devices::virtio::vsock::VsockConfig;
use smolvm::{ExitReason, NetDevice, VmBuilder, VmHandle};

/// Printed by the guest's init once it runs.
const INIT_MARKER: &str = "SMOLVM-E2E-INIT";
/// Printed by the guest's init: `SMOLVM-E2E-CPUS <n>`.
const CPUS_MARKER: &str = "SMOLVM-E2E-CPUS ";
/// Host side of the guest network.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Guest side.
const GUEST_IP: &str = "10.0.2.2/24";

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    pass: usize,
    fail: usize,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.pass += 1;
                println!("PASS {name}");
            }
            Err(why) => {
                self.fail += 1;
                println!("FAIL {name}: {}", why.replace('\n', "\\n"));
            }
        }
    }

    fn data(&self, name: &str, value: impl std::fmt::Display) {
        println!("DATA {name} {value}");
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Console capture with timestamps
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ConsoleState {
    bytes: Vec<u8>,
    first_byte: Option<Instant>,
    init: Option<Instant>,
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<ConsoleState>>);

impl Console {
    fn sink(&self) -> impl FnMut(&[u8]) + Send + 'static {
        let state = self.0.clone();
        move |bytes: &[u8]| {
            let now = Instant::now();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.first_byte.get_or_insert(now);
            let from = s.bytes.len().saturating_sub(INIT_MARKER.len());
            s.bytes.extend_from_slice(bytes);
            if s.init.is_none() && contains(&s.bytes[from..], INIT_MARKER.as_bytes()) {
                s.init = Some(now);
            }
        }
    }

    fn text(&self) -> String {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&s.bytes).into_owned()
    }

    fn times(&self) -> (Option<Instant>, Option<Instant>) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (s.first_byte, s.init)
    }

    fn tail(&self, n: usize) -> String {
        let t = self.text();
        let start = t.len().saturating_sub(n);
        let start = (start..t.len())
            .find(|&i| t.is_char_boundary(i))
            .unwrap_or(t.len());
        t[start..].to_string()
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Small host-side helpers
// ---------------------------------------------------------------------------------------------

/// SHA-256 as lowercase hex (the guest's busybox `sha256sum` computes the same).
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// FNV-1a 64 of a file, to tell whether an image changed.
fn file_hash(path: &Path) -> Result<u64, String> {
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }))
}

fn file_contains(path: &Path, needle: &str) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(contains(&data, needle.as_bytes()))
}

/// Pseudo-random bytes (xorshift), so the copy check moves data that does not compress.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn unique_token(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("smolvm-e2e-{what}-{nanos:x}-{}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Guest commands
// ---------------------------------------------------------------------------------------------

/// Runs `script` with `sh -c` through the agent; Ok(stdout) when it exits 0.
fn sh(vm: &VmHandle, script: &str) -> Result<String, String> {
    let out = vm
        .exec(
            &Command::new("/bin/sh")
                .arg("-c")
                .arg(script)
                .timeout(Duration::from_secs(60)),
        )
        .map_err(|e| format!("exec `{script}`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{script}`: {}; stdout {:?}; stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The guest's device node for the disk with this ext4 label (disks are attached in the order
/// rw, ov, ro, so /dev/vda, vdb, vdc is the fallback).
fn disk_node(label: &str, fallback: &str) -> String {
    format!("$(findfs LABEL={label} 2>/dev/null || echo {fallback})")
}

// ---------------------------------------------------------------------------------------------
// The boots
// ---------------------------------------------------------------------------------------------

struct Assets {
    kernel: PathBuf,
    initrd: PathBuf,
    rw: PathBuf,
    ov: PathBuf,
    ro: PathBuf,
    rootfs: PathBuf,
    hello: String,
    out: PathBuf,
}

fn base_cmdline(quiet: bool) -> KernelCmdline {
    let mut c = KernelCmdline::default();
    // The default forbids module loading; this guest's drivers are modules.
    c.remove("nomodule");
    c.remove("loglevel");
    c.remove("quiet");
    if quiet {
        c.append("quiet loglevel=1");
    } else {
        c.append("loglevel=6");
    }
    c.set("rdinit", "/init");
    c
}

/// CPU time (user + system, clock ticks) of each thread of this process, by name: tells a
/// vCPU spinning in the guest from one blocked in the kernel (WFI) when a guest hangs.
fn thread_times() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // After the name: state(0) ... utime(11) stime(12).
        let ticks = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        out.push((format!("{name}[{}]", fields.first().unwrap_or(&"?")), ticks));
    }
    out
}

/// Samples [`thread_times`] twice, a second apart, and prints the busy threads to stderr.
fn print_thread_activity(what: &str) {
    let a = thread_times();
    std::thread::sleep(Duration::from_secs(1));
    let b = thread_times();
    let mut line = format!("threads during {what} (CPU ticks in 1 s):");
    for (name, t1) in &b {
        let t0 = a
            .iter()
            .find(|(n, _)| n.split('[').next() == name.split('[').next())
            .map(|x| x.1);
        line.push_str(&format!(" {name}={}", t1.saturating_sub(t0.unwrap_or(*t1))));
    }
    eprintln!("{line}");
}

fn save_console(a: &Assets, name: &str, console: &Console) {
    let _ = std::fs::write(a.out.join(format!("{name}.console.log")), console.text());
}

fn report_boot_failure(r: &mut Report, check: &str, why: String, console: &Console) {
    r.check(
        check,
        Err(format!("{why}; console tail: {:?}", console.tail(1500))),
    );
}

/// Boot A: devices, agent.
fn boot_devices(a: &Assets, r: &mut Report) {
    let boot_timeout = env_secs("SMOLVM_E2E_BOOT_TIMEOUT", 240);
    let ov_before = file_hash(&a.ov);
    let ro_before = file_hash(&a.ro);
    let rw_token = unique_token("rw");
    let ov_token = unique_token("ov");

    let console = Console::default();
    let disks = (|| -> Result<_, String> {
        Ok((
            DiskImage::open(&a.rw, DiskMode::ReadWrite).map_err(|e| format!("rw.img: {e}"))?,
            DiskImage::open(&a.ov, DiskMode::Overlay(OverlayTarget::Memory))
                .map_err(|e| format!("ov.img: {e}"))?,
            DiskImage::open(&a.ro, DiskMode::ReadOnly).map_err(|e| format!("ro.img: {e}"))?,
        ))
    })();
    let (rw, ov, ro) = match disks {
        Ok(d) => d,
        Err(e) => return r.check("boot.devices", Err(e)),
    };
    let t0 = Instant::now();
    let vm = VmBuilder::new()
        .memory_mib(512)
        .vcpus(1)
        .kernel(&a.kernel)
        .initrd(&a.initrd)
        .cmdline(base_cmdline(true))
        .console_callback(console.sink())
        .block_device(rw)
        .block_device(ov)
        .block_device(ro)
        .net_device(NetDevice::create_tap(TapConfig {
            ipv4: Some((HOST_IP, 24)),
            ..Default::default()
        }))
        .vsock(VsockConfig::new(3))
        .start();
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => return r.check("boot.devices", Err(format!("start: {e}"))),
    };

    let ready = vm.wait_agent_ready(boot_timeout);
    let t_ready = t0.elapsed();
    let (first, init) = console.times();
    if let Some(f) = first {
        r.data("boot_devices.first_console_byte", ms(f - t0));
    }
    match init {
        Some(i) => {
            r.data("boot_devices.to_init", ms(i - t0));
            r.check("boot.console", Ok(()));
        }
        None => report_boot_failure(
            r,
            "boot.console",
            format!(
                "no {INIT_MARKER} on the console (exit: {:?})",
                vm.wait_timeout(Duration::ZERO)
            ),
            &console,
        ),
    }
    match ready {
        Ok(info) => {
            r.data("boot_devices.to_agent_ready", ms(t_ready));
            r.check("vsock.agent-ready", Ok(()));
            eprintln!("agent {} on {}", info.agent_version, info.hostname);
        }
        Err(e) => {
            report_boot_failure(r, "vsock.agent-ready", format!("{e}"), &console);
            let reason = vm.stop();
            eprintln!("boot A stopped: {reason}");
            save_console(a, "boot_devices", &console);
            return;
        }
    }

    // --- vsock / exec -------------------------------------------------------------------
    r.check(
        "vsock.exec-uname",
        (|| {
            let out = vm
                .exec(&Command::new("uname").arg("-a"))
                .map_err(|e| e.to_string())?;
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            eprintln!("guest uname -a: {}", s.trim());
            if !out.status.success() || !s.starts_with("Linux ") {
                return Err(format!("{}: {s:?}", out.status));
            }
            let arch = std::env::consts::ARCH;
            if !s.contains(arch) {
                return Err(format!("{s:?} does not name {arch}"));
            }
            Ok(())
        })(),
    );

    r.check(
        "vsock.exec-large-output",
        (|| {
            let n = 100_000;
            let want: String = (1..=n).map(|i| format!("{i}\n")).collect();
            let t = Instant::now();
            let out = vm
                .exec(&Command::new("seq").arg("1").arg(n.to_string()))
                .map_err(|e| e.to_string())?;
            r.data(
                "exec_large_output.bytes_per_s",
                format!("{:.0}", want.len() as f64 / t.elapsed().as_secs_f64()),
            );
            if !out.status.success() {
                return Err(format!("{}", out.status));
            }
            if out.stdout != want.as_bytes() {
                return Err(format!(
                    "got {} bytes, want {} (first difference at {:?})",
                    out.stdout.len(),
                    want.len(),
                    out.stdout
                        .iter()
                        .zip(want.as_bytes())
                        .position(|(a, b)| a != b)
                ));
            }
            Ok(())
        })(),
    );

    r.check(
        "vsock.exec-failing-command",
        (|| {
            let out = vm
                .exec(
                    &Command::new("/bin/sh")
                        .arg("-c")
                        .arg("echo oops >&2; exit 3"),
                )
                .map_err(|e| e.to_string())?;
            if out.status != ExitStatus::Exited(3) || out.stderr != b"oops\n" {
                return Err(format!(
                    "{}; stderr {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(())
        })(),
    );

    r.check(
        "vsock.exec-timeout",
        (|| {
            let t = Instant::now();
            let out = vm
                .exec(
                    &Command::new("sleep")
                        .arg("60")
                        .timeout(Duration::from_secs(2)),
                )
                .map_err(|e| e.to_string())?;
            let took = t.elapsed();
            if out.status != ExitStatus::TimedOut {
                return Err(format!("status {} after {took:?}", out.status));
            }
            if took > Duration::from_secs(20) {
                return Err(format!("timed out only after {took:?}"));
            }
            Ok(())
        })(),
    );

    r.check(
        "vsock.copy-in-out",
        (|| {
            let data = random_bytes(256 * 1024 + 123, 0x5eed);
            let local_in = a.out.join("copy-in.bin");
            let local_out = a.out.join("copy-out.bin");
            std::fs::write(&local_in, &data).map_err(|e| e.to_string())?;
            vm.copy_in(&local_in, "/tmp/e2e-in.bin", 0o644)
                .map_err(|e| format!("copy_in: {e}"))?;
            let sum = sh(
                &vm,
                "sha256sum /tmp/e2e-in.bin && cp /tmp/e2e-in.bin /tmp/e2e-out.bin",
            )?;
            let want = sha256_hex(&data);
            if !sum.starts_with(&want) {
                return Err(format!("guest sha256sum {sum:?}, host {want}"));
            }
            vm.copy_out("/tmp/e2e-out.bin", &local_out)
                .map_err(|e| format!("copy_out: {e}"))?;
            let back = std::fs::read(&local_out).map_err(|e| e.to_string())?;
            if sha256_hex(&back) != want || back != data {
                return Err(format!("copied back {} bytes that differ", back.len()));
            }
            Ok(())
        })(),
    );

    // Exec round trip: median of N `true`.
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        if vm.exec(&Command::new("true")).is_err() {
            break;
        }
        rtts.push(t.elapsed());
    }
    if !rtts.is_empty() {
        rtts.sort();
        r.data("exec_rtt.median", ms(rtts[rtts.len() / 2]));
        r.data("exec_rtt.min", ms(rtts[0]));
        r.data("exec_rtt.samples", rtts.len());
    }

    // --- virtio-blk -----------------------------------------------------------------------
    let rw_dev = disk_node("e2e-rw", "/dev/vda");
    let ov_dev = disk_node("e2e-ov", "/dev/vdb");
    let ro_dev = disk_node("e2e-ro", "/dev/vdc");
    r.check(
        "blk.read",
        (|| {
            let got = sh(
                &vm,
                &format!(
                    "mkdir -p /mnt/rw && mount -t ext4 {rw_dev} /mnt/rw && cat /mnt/rw/hello.txt"
                ),
            )?;
            if got != a.hello {
                return Err(format!("read {got:?}, want {:?}", a.hello));
            }
            Ok(())
        })(),
    );
    let rw_written = sh(
        &vm,
        &format!("echo {rw_token} > /mnt/rw/from-guest.txt && umount /mnt/rw && sync"),
    );
    let ov_result = sh(
        &vm,
        &format!(
            "mkdir -p /mnt/ov && mount -t ext4 {ov_dev} /mnt/ov && cat /mnt/ov/hello.txt >/dev/null \
             && echo {ov_token} > /mnt/ov/from-guest.txt && umount /mnt/ov && sync \
             && mount -t ext4 {ov_dev} /mnt/ov && cat /mnt/ov/from-guest.txt && umount /mnt/ov"
        ),
    );
    let ro_result = (|| {
        let dev = sh(&vm, &format!("echo {ro_dev}"))?;
        let dev = dev.trim();
        let getro = sh(&vm, &format!("blockdev --getro {dev}"))?;
        let write = vm
            .exec(&Command::new("/bin/sh").arg("-c").arg(format!(
                "dd if=/dev/zero of={dev} bs=4096 count=1 conv=fsync 2>&1"
            )))
            .map_err(|e| e.to_string())?;
        if write.status.success() {
            return Err(format!(
                "writing {dev} succeeded: {:?}",
                String::from_utf8_lossy(&write.stdout)
            ));
        }
        let read = sh(
            &vm,
            &format!("mkdir -p /mnt/ro && mount -t ext4 -o ro {dev} /mnt/ro && cat /mnt/ro/hello.txt && umount /mnt/ro"),
        )?;
        if read != a.hello {
            return Err(format!("read {read:?} from the read-only disk"));
        }
        Ok(format!(
            "getro={} write: {}",
            getro.trim(),
            String::from_utf8_lossy(&write.stdout).trim()
        ))
    })();

    // --- virtio-net -----------------------------------------------------------------------
    r.check(
        "net.ping",
        (|| {
            sh(
                &vm,
                &format!("ip link set eth0 up && ip addr add {GUEST_IP} dev eth0"),
            )?;
            let mut last = String::new();
            for _ in 0..3 {
                match sh(&vm, &format!("ping -c 1 -W 5 {HOST_IP}")) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })(),
    );

    // --- power-off --------------------------------------------------------------------------
    let poweroff = sh(
        &vm,
        "setsid sh -c 'sleep 1; poweroff -f' </dev/null >/dev/null 2>&1 &",
    );
    let reason = vm.wait_timeout(Duration::from_secs(60));
    let reason = match reason {
        Some(r) => r,
        None => {
            print_thread_activity("the power-off hang");
            vm.stop();
            ExitReason::Stopped
        }
    };
    save_console(a, "boot_devices", &console);
    r.check(
        "power.poweroff",
        match (&poweroff, &reason) {
            (_, ExitReason::PowerOff) => Ok(()),
            // x86 guests get no ACPI tables, so Linux has no power-off method: its reboot
            // syscall turns POWER_OFF into HALT and every CPU stops with interrupts off,
            // which smolvm reports as Halted (the microVM's documented power-off on x86).
            (_, ExitReason::Halted) if cfg!(target_arch = "x86_64") => Ok(()),
            (Err(e), _) => Err(format!("asking for power-off: {e}; VM ended: {reason}")),
            (Ok(_), _) => Err(format!("VM ended with {reason} (60 s after poweroff -f)")),
        },
    );

    // Host-side disk checks (the VM, and with it the disks, is gone now).
    r.check(
        "blk.write-readwrite",
        (|| {
            rw_written?;
            if !file_contains(&a.rw, &rw_token)? {
                return Err(format!(
                    "{} does not contain the guest's write",
                    a.rw.display()
                ));
            }
            Ok(())
        })(),
    );
    r.check(
        "blk.write-overlay",
        (|| {
            let got = ov_result?;
            if got.trim() != ov_token {
                return Err(format!("guest read back {got:?} from the overlay"));
            }
            if file_contains(&a.ov, &ov_token)? {
                return Err("the guest's write reached the base image".into());
            }
            if file_hash(&a.ov)? != ov_before.clone()? {
                return Err("the base image changed".into());
            }
            Ok(())
        })(),
    );
    r.check(
        "blk.readonly",
        (|| {
            let how = ro_result?;
            eprintln!("read-only disk: {how}");
            if file_hash(&a.ro)? != ro_before.clone()? {
                return Err("the read-only image changed".into());
            }
            Ok(())
        })(),
    );
}

/// Boot B: 2 vCPUs, reboot from inside, kernel start time. `vcpus`/`action` vary it for
/// experiments (`SMOLVM_E2E_EXTRA_BOOTS`); `tag` names its checks and data.
fn boot_smp_reboot(a: &Assets, r: &mut Report, vcpus: u32, action: &str, tag: &str, append: &str) {
    let boot_timeout = env_secs("SMOLVM_E2E_BOOT_TIMEOUT", 240);
    let mut cmdline = base_cmdline(false);
    cmdline.set("smolvm_e2e", action);
    if !append.is_empty() {
        cmdline.append(append);
    }
    let (cpu_check, power_check, want_exit) = if tag == "boot_smp" {
        (
            "smp.two-vcpus".to_string(),
            "power.reboot".to_string(),
            ExitReason::Reset,
        )
    } else {
        let want = if action == "poweroff" && cfg!(target_arch = "x86_64") {
            ExitReason::Halted // no ACPI: see power.poweroff above
        } else if action == "poweroff" {
            ExitReason::PowerOff
        } else {
            ExitReason::Reset
        };
        (format!("{tag}.cpus"), format!("{tag}.{action}"), want)
    };
    let halt_probe = if tag != "boot_smp"
        && std::env::var("SMOLVM_E2E_EXTRA_HALT_PROBE").as_deref() == Ok("off")
    {
        None
    } else {
        Some(Duration::from_millis(200)) // the default
    };
    // The 2-vCPU reboot sometimes hangs after `reboot -f` under nested KVM (root cause not
    // found; see guest/e2e/README.md): one more attempt, and the hang is reported as DATA, so
    // a flake is visible without failing the run. A second hang fails the check.
    let attempts = if tag == "boot_smp" { 2 } else { 1 };
    // A normal 2-vCPU boot and reboot takes 5-15 s here: don't wait the full boot timeout
    // for a hang that will be retried.
    let boot_timeout = if attempts > 1 {
        boot_timeout.min(Duration::from_secs(120))
    } else {
        boot_timeout
    };
    let mut hung = 0;
    let (console, reason, t0) = loop {
        let console = Console::default();
        let t0 = Instant::now();
        let vm = VmBuilder::new()
            .memory_mib(512)
            .halt_probe(halt_probe)
            .vcpus(vcpus)
            .kernel(&a.kernel)
            .initrd(&a.initrd)
            .cmdline(cmdline.clone())
            .console_callback(console.sink())
            .start();
        let vm = match vm {
            Ok(vm) => vm,
            Err(e) => {
                r.check(&cpu_check, Err(format!("start: {e}")));
                r.check(&power_check, Err(format!("start: {e}")));
                return;
            }
        };
        let reason = vm.wait_timeout(boot_timeout).unwrap_or_else(|| {
            print_thread_activity(&format!("the {tag} hang"));
            vm.stop();
            ExitReason::Stopped
        });
        let hang_after_action =
            reason == ExitReason::Stopped && console.text().contains(CPUS_MARKER.trim_end());
        if hang_after_action && hung + 1 < attempts {
            hung += 1;
            eprintln!(
                "{tag}: attempt {hung} hung after `{action} -f` ({boot_timeout:?}); trying again"
            );
            save_console(a, &format!("{tag}.hung{hung}"), &console);
            continue;
        }
        break (console, reason, t0);
    };
    if attempts > 1 {
        r.data(&format!("{tag}.hung_attempts"), hung.to_string());
    }
    let end = t0.elapsed();
    save_console(a, tag, &console);
    let (first, init) = console.times();
    let text = console.text();
    if let Some(f) = first {
        r.data(&format!("{tag}.kernel_start"), ms(f - t0));
    }
    if let Some(i) = init {
        r.data(&format!("{tag}.to_init"), ms(i - t0));
    }
    r.data(&format!("{tag}.to_exit"), ms(end));
    let cpus = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix(CPUS_MARKER.trim_end())
            .map(|v| v.trim().to_string())
    });
    let want_cpus = vcpus.to_string();
    match cpus {
        Some(n) if n == want_cpus => r.check(&cpu_check, Ok(())),
        Some(n) => r.check(
            &cpu_check,
            Err(format!("the guest sees {n} CPUs, want {vcpus}")),
        ),
        None => report_boot_failure(
            r,
            &cpu_check,
            format!("no {CPUS_MARKER}line (VM ended: {reason})"),
            &console,
        ),
    }
    if init.is_some() {
        if reason == want_exit {
            r.check(&power_check, Ok(()));
        } else {
            report_boot_failure(
                r,
                &power_check,
                format!("VM ended with {reason} after `{action} -f`, want {want_exit}"),
                &console,
            );
        }
    } else {
        report_boot_failure(
            r,
            &power_check,
            format!("init never ran (VM ended: {reason})"),
            &console,
        );
    }
}

/// Boot C: smolvm's root file system (guest/rootfs/build.sh) as the only disk, the way
/// `examples/boot_alpine.rs` boots it: in-memory overlay, `root=/dev/vda rw`, no initrd.
fn boot_rootfs(a: &Assets, r: &mut Report) {
    const CHECK: &str = "rootfs.boot";
    let boot_timeout = env_secs("SMOLVM_E2E_BOOT_TIMEOUT", 240);
    let console = Console::default();
    let disk = match DiskImage::open(&a.rootfs, DiskMode::Overlay(OverlayTarget::Memory)) {
        Ok(d) => d,
        Err(e) => return r.check(CHECK, Err(format!("rootfs.ext4: {e}"))),
    };
    let mut cmdline = KernelCmdline::default();
    cmdline.append("root=/dev/vda rw");
    let t0 = Instant::now();
    let vm = VmBuilder::new()
        .memory_mib(256)
        .vcpus(1)
        .kernel(&a.kernel)
        .cmdline(cmdline)
        .console_callback(console.sink())
        .block_device(disk)
        .vsock(VsockConfig::new(3))
        .start();
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => return r.check(CHECK, Err(format!("start: {e}"))),
    };
    let result = (|| {
        vm.wait_agent_ready(boot_timeout).map_err(|e| {
            format!(
                "agent not ready: {e} (exit: {:?})",
                vm.wait_timeout(Duration::ZERO)
            )
        })?;
        r.data("rootfs.to_agent_ready", ms(t0.elapsed()));
        let out = vm
            .exec(
                &Command::new("cat")
                    .arg("/etc/os-release")
                    .timeout(Duration::from_secs(60)),
            )
            .map_err(|e| format!("exec cat /etc/os-release: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("cat /etc/os-release: {}; {text:?}", out.status));
        }
        let id = text.lines().find(|l| l.starts_with("ID="));
        if !matches!(id, Some("ID=smolvm-busybox" | "ID=alpine")) {
            return Err(format!("/etc/os-release has {id:?}: {text:?}"));
        }
        eprintln!("rootfs: {}", id.unwrap_or_default());
        // The agent's connection dies with the guest: the call's own result does not matter.
        let _ = vm.exec(
            &Command::new("poweroff")
                .arg("-f")
                .timeout(Duration::from_secs(10)),
        );
        Ok(())
    })();
    let reason = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        print_thread_activity("the rootfs power-off hang");
        vm.stop();
        ExitReason::Stopped
    });
    r.data("rootfs.to_exit", ms(t0.elapsed()));
    save_console(a, "boot_rootfs", &console);
    match result {
        Err(why) => report_boot_failure(r, CHECK, why, &console),
        Ok(()) if reason == ExitReason::PowerOff => r.check(CHECK, Ok(())),
        // x86 microVM kernel: no ACPI, power-off halts (see power.poweroff).
        Ok(()) if reason == ExitReason::Halted && cfg!(target_arch = "x86_64") => {
            r.check(CHECK, Ok(()))
        }
        Ok(()) => report_boot_failure(
            r,
            CHECK,
            format!(
                "VM ended with {reason} after `poweroff -f`, want {}",
                ExitReason::PowerOff
            ),
            &console,
        ),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: smolvm-e2e probe | smolvm-e2e run --assets DIR --out DIR [--only devices|smp|rootfs]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("probe") => {
            let report = smolvm::probe();
            match report.linux_blocker() {
                Some(why) => {
                    println!("SKIPPED: this host cannot boot an unmodified Linux guest: {why}")
                }
                None => println!("OK"),
            }
            return;
        }
        Some("run") => {}
        _ => usage(),
    }
    let mut assets = None;
    let mut out = None;
    let mut only = None;
    if only.is_none() {
        only = std::env::var("SMOLVM_E2E_ONLY")
            .ok()
            .filter(|v| !v.is_empty());
    }
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--assets" => assets = it.next().map(PathBuf::from),
            "--out" => out = it.next().map(PathBuf::from),
            "--only" => only = it.next().cloned(),
            _ => usage(),
        }
    }
    let (Some(dir), Some(out)) = (assets, out) else {
        usage()
    };
    let _ = std::fs::create_dir_all(&out);
    let hello = std::fs::read_to_string(dir.join("hello.txt")).unwrap_or_default();
    let a = Assets {
        kernel: dir.join("kernel"),
        initrd: dir.join("initrd"),
        rw: dir.join("rw.img"),
        ov: dir.join("ov.img"),
        ro: dir.join("ro.img"),
        rootfs: dir.join("rootfs.ext4"),
        hello,
        out,
    };
    let mut r = Report::default();
    let t = Instant::now();
    if only.is_none() || only.as_deref() == Some("devices") {
        boot_devices(&a, &mut r);
    }
    if only.is_none() || only.as_deref() == Some("smp") {
        boot_smp_reboot(&a, &mut r, 2, "reboot", "boot_smp", "");
    }
    if (only.is_none() || only.as_deref() == Some("rootfs")) && a.rootfs.is_file() {
        boot_rootfs(&a, &mut r);
    }
    r.data("suite.total", ms(t.elapsed()));
    // Diagnostic boots: SMOLVM_E2E_EXTRA_BOOTS="VCPUS:ACTION[:LOGLEVEL] ..." (reported as
    // `extraN.*` checks).
    if let Ok(extra) = std::env::var("SMOLVM_E2E_EXTRA_BOOTS") {
        for (i, spec) in extra.split_whitespace().enumerate() {
            let mut parts = spec.split(':');
            let vcpus = parts.next().and_then(|v| v.parse().ok()).unwrap_or(1);
            let action = parts.next().unwrap_or("reboot").to_string();
            let append = parts
                .next()
                .map(|l| format!("loglevel={l}"))
                .unwrap_or_default();
            boot_smp_reboot(&a, &mut r, vcpus, &action, &format!("extra{i}"), &append);
        }
    }
    r.data("runner.total", ms(t.elapsed()));
    println!("E2E-RESULT pass={} fail={}", r.pass, r.fail);
    std::process::exit(i32::from(r.fail > 0));
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_matches_coreutils() {
        assert_eq!(
            super::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // `printf 'hello\n' | sha256sum`
        assert_eq!(
            super::sha256_hex(b"hello\n"),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let big = super::random_bytes(100_000, 7);
        std::fs::write("/tmp/smolvm-e2e-sha-test.bin", &big).unwrap();
        let out = std::process::Command::new("sha256sum")
            .arg("/tmp/smolvm-e2e-sha-test.bin")
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&super::sha256_hex(&big)));
    }
}

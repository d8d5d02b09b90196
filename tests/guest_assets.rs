//! Tests of the guest asset builders in `guest/` (see `guest/README.md`).
//!
//! - `rootfs_busybox_fallback_has_init_agent_and_os_release`: runs `guest/rootfs/build.sh`
//!   in forced fallback mode (`SMOLVM_ROOTFS_OFFLINE=1`) into a temporary cache and inspects
//!   the ext4 image with `debugfs`: `/sbin/init` and `/sbin/smolvm-agent` are executable
//!   regular files, `/etc/os-release` names the busybox fallback, `/bin/sh` is there, the
//!   output carries the `FALLBACK:` label, and a second run is a cache hit. Builds the agent
//!   through `guest/agent/build.sh` unless `SMOLVM_AGENT_BIN` names one.
//! - `kernel_fragment_survives_olddefconfig_*`: `guest/kernel/build.sh --check-config ARCH`
//!   (allnoconfig + fragment, olddefconfig, every option of the fragment checked) in a
//!   temporary build directory. No kernel build. The source is `$SMOLVM_KERNEL_SOURCE` or
//!   Debian's `/usr/src/linux-source-6.1.tar.xz` (extracted once into `$SMOLVM_CACHE`, about
//!   10-20 s the first time; a few seconds after that).
//!
//! Missing tools (mkfs.ext4/debugfs/busybox-static; a kernel source; the aarch64 cross
//! compiler) make a test print `SKIPPED: <test>: <reason>` on stderr and pass, unless
//! `SMOLVM_REQUIRE_ASSETS=1`, where it runs anyway (the scripts install what they can with
//! apt-get as root, or fail saying what is missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var("SMOLVM_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// Prints the loud skip line (past the harness's capture) and says whether to return.
fn skip(test: &str, reason: &str) -> bool {
    if required() {
        eprintln!("{test}: {reason}; SMOLVM_REQUIRE_ASSETS=1, running anyway");
        false
    } else {
        eprintln!("SKIPPED: {test}: {reason} (set SMOLVM_REQUIRE_ASSETS=1 to make this a failure)");
        true
    }
}

/// The path of `tool` on PATH or in the sbin directories (debugfs lives in /sbin).
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("smolvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `debugfs -R <request> <image>`'s stdout.
fn debugfs(debugfs: &Path, image: &Path, request: &str) -> String {
    let out = run(Command::new(debugfs).arg("-R").arg(request).arg(image));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The octal permission bits and type of `path` in the image, from `debugfs stat`.
fn stat(dbg: &Path, image: &Path, path: &str) -> (String, u32) {
    let s = debugfs(dbg, image, &format!("stat {path}"));
    let kind = s
        .split("Type: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{path} is not in the image:\n{s}"))
        .to_string();
    let mode = s
        .split("Mode: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or_else(|| panic!("no mode for {path}:\n{s}"));
    (kind, mode)
}

#[test]
fn rootfs_busybox_fallback_has_init_agent_and_os_release() {
    const TEST: &str = "rootfs_busybox_fallback_has_init_agent_and_os_release";
    let busybox_static = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"));
    let missing: Vec<&str> = [
        ("mkfs.ext4", find_tool("mkfs.ext4").is_some()),
        ("debugfs", find_tool("debugfs").is_some()),
        (
            "busybox-static",
            busybox_static || std::env::var_os("SMOLVM_BUSYBOX").is_some(),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty()
        && skip(
            TEST,
            &format!(
                "missing {} (apt-get install e2fsprogs busybox-static)",
                missing.join(", ")
            ),
        )
    {
        return;
    }
    let dbg = find_tool("debugfs").expect("debugfs (e2fsprogs) is needed to inspect the image");

    let cache = TempDir::new("rootfs-test");
    let build = || {
        let t = Instant::now();
        let out = run(Command::new(repo().join("guest/rootfs/build.sh"))
            .env("SMOLVM_CACHE", &cache.0)
            .env("SMOLVM_ROOTFS_OFFLINE", "1"));
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "{TEST}: guest/rootfs/build.sh took {:.1} s",
            t.elapsed().as_secs_f64()
        );
        (
            PathBuf::from(stdout.lines().last().unwrap_or_default()),
            stderr,
        )
    };

    let (image, stderr) = build();
    assert!(
        stderr.contains("FALLBACK: busybox rootfs (Alpine mirror unreachable)"),
        "the fallback is not labelled:\n{stderr}"
    );
    assert!(
        image.starts_with(&cache.0),
        "image {image:?} is outside the cache"
    );
    assert_eq!(image.file_name().unwrap(), "rootfs.ext4");
    let meta = std::fs::metadata(&image).expect("the printed image path does not exist");
    eprintln!("{TEST}: {} ({} bytes, sparse)", image.display(), meta.len());

    for exe in ["/sbin/init", "/sbin/smolvm-agent", "/bin/busybox"] {
        let (kind, mode) = stat(&dbg, &image, exe);
        assert_eq!(kind, "regular", "{exe} is not a regular file");
        assert_eq!(
            mode & 0o111,
            0o111,
            "{exe} is not executable (mode {mode:o})"
        );
    }
    let (kind, _) = stat(&dbg, &image, "/bin/sh");
    assert_eq!(kind, "symlink", "/bin/sh should be a busybox link");

    let os_release = debugfs(&dbg, &image, "cat /etc/os-release");
    assert!(
        os_release.contains("ID=smolvm-busybox"),
        "os-release:\n{os_release}"
    );
    assert!(
        os_release.contains("smolvm busybox fallback"),
        "os-release:\n{os_release}"
    );
    let init = debugfs(&dbg, &image, "cat /sbin/init");
    assert!(
        init.starts_with("#!/bin/sh"),
        "init is not a shell script:\n{init}"
    );
    assert!(
        init.contains("/sbin/smolvm-agent"),
        "init does not start the agent"
    );
    assert!(init.contains("poweroff -f"), "init does not power off");
    let root = debugfs(&dbg, &image, "ls -l /");
    for dir in ["proc", "sys", "dev", "tmp", "etc"] {
        assert!(
            root.contains(&format!(" {dir}\n")),
            "no /{dir} in the image:\n{root}"
        );
    }

    // Same inputs: a cache hit, same path.
    let (again, stderr) = build();
    assert_eq!(again, image);
    assert!(stderr.contains("cached:"), "second run rebuilt:\n{stderr}");
}

fn kernel_fragment_check(arch: &str, test: &str) {
    let debian = Path::new("/usr/src/linux-source-6.1.tar.xz");
    if std::env::var_os("SMOLVM_KERNEL_SOURCE").is_none()
        && !debian.exists()
        && skip(
            test,
            "no kernel source: set SMOLVM_KERNEL_SOURCE or apt-get install linux-source-6.1",
        )
    {
        return;
    }
    let missing: Vec<&str> = ["make", "gcc", "bison", "flex", "bc"]
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if !missing.is_empty()
        && skip(
            test,
            &format!(
                "missing {} (apt-get install build-essential bc bison flex libelf-dev)",
                missing.join(", ")
            ),
        )
    {
        return;
    }
    if arch == "aarch64"
        && std::env::consts::ARCH != "aarch64"
        && find_tool("aarch64-linux-gnu-gcc").is_none()
        && skip(
            test,
            "no aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)",
        )
    {
        return;
    }
    let t = Instant::now();
    let out = run(Command::new(repo().join("guest/kernel/build.sh"))
        .args(["--check-config", arch])
        // The source comes from SMOLVM_KERNEL_SOURCE, a cached kernel.org tarball, or Debian's:
        // never a download from a test.
        .env("SMOLVM_KERNEL_OFFLINE", "1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{test}: {} ({:.1} s)",
        stderr.trim_end().lines().last().unwrap_or_default(),
        t.elapsed().as_secs_f64()
    );
    assert!(stderr.contains("hold after olddefconfig"), "{stderr}");
}

#[test]
fn kernel_fragment_survives_olddefconfig_x86_64() {
    kernel_fragment_check("x86_64", "kernel_fragment_survives_olddefconfig_x86_64");
}

#[test]
fn kernel_fragment_survives_olddefconfig_aarch64() {
    kernel_fragment_check("aarch64", "kernel_fragment_survives_olddefconfig_aarch64");
}

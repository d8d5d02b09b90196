//! Throwaway network namespaces for network tests: everything a test creates (TAP devices,
//! packet sockets, addresses) lives in a namespace the test made and deletes, so no test
//! traffic touches the host's interfaces.
//!
//! Creating a namespace needs CAP_SYS_ADMIN and `ip` (iproute2). Where that is missing,
//! [`NetNs::new`] says why; tests then print a loud `SKIPPED` line, or fail when
//! `SMOLVM_REQUIRE_NET=1` (CI sets it).

#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// `true` when network tests may run; otherwise prints why on stderr (bypassing the test
/// harness's capture) and returns `false`, or panics when `SMOLVM_REQUIRE_NET=1`.
pub fn can_use_netns() -> bool {
    match probe() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var_os("SMOLVM_REQUIRE_NET").is_some_and(|v| v == "1") {
                panic!("SMOLVM_REQUIRE_NET=1 but network namespaces are unusable: {why}");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: network namespace test: {why} (run as root with iproute2 and \
                 /dev/net/tun, or set SMOLVM_REQUIRE_NET=1 to make this a failure)"
            );
            false
        }
    }
}

fn probe() -> Result<(), String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun does not exist".into());
    }
    let ns = NetNs::new("probe")?;
    drop(ns);
    Ok(())
}

/// A network namespace, deleted on drop (with every interface still in it).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `smolvm-<tag>-<pid>-<n>` and brings its loopback up.
    pub fn new(tag: &str) -> Result<Self, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "smolvm-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run_ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No IPv6 on new interfaces: otherwise the kernel sends router solicitations and MLD
        // reports through every TAP it brings up, and tests see frames they did not send.
        for key in ["default", "all"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.name, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
                .output()
                .map_err(|e| format!("running sysctl in the namespace: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "disabling IPv6 in the namespace: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(ns)
    }

    /// The namespace's name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets and TAP devices it
    /// creates belong to the namespace (their descriptors work from any thread afterwards).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on this thread only, with a namespace fd we own; the thread
                // ends when the scope does, so no other code runs in the namespace by accident.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Whether an interface called `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).is_ok()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "delete", &self.name]) {
            eprintln!("deleting network namespace {}: {e}", self.name);
        }
    }
}

fn run_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An `AF_PACKET` socket bound to one interface: sends raw Ethernet frames onto it and sees
/// every frame crossing it. Create it inside the namespace ([`NetNs::run_in`]).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Binds to interface `ifname` for Ethernet type `ethertype` (host order).
    pub fn bind(ifname: &str, ethertype: u16) -> io::Result<Self> {
        let cname = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = ethertype.to_be();
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket {
            fd,
            ifindex: ifindex as i32,
        })
    }

    /// Sends one complete Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(n as usize, frame.len(), "short packet send");
        Ok(())
    }

    /// The next frame that *arrived* on the interface (frames this host sent are skipped),
    /// or `None` after `timeout`.
    pub fn recv_incoming(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                continue;
            }
            // SAFETY: zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `from` are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING || from.sll_ifindex != self.ifindex {
                continue;
            }
            return Ok(Some(buf[..n as usize].to_vec()));
        }
    }
}

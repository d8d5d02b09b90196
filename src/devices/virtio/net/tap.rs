//! The TAP backend (Linux): a host network interface whose other side is a file descriptor.
//!
//! Opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with a 12-byte vnet header (`TUNSETVNETHDRSZ`)
//! so frames carry the same `virtio_net_hdr_v1` as the virtqueues, non-blocking for the
//! device event loop. Receive offloads follow what the guest negotiated (`TUNSETOFFLOAD`).
//!
//! [`Tap::create`] makes a **non-persistent** interface: it exists as long as the [`Tap`]
//! (its descriptor) does, so dropping the device (stopping the VM) leaves nothing behind,
//! whatever the exit path.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::{NetBackend, TxFrame};
use super::{
    NetError, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VNET_HDR_LEN,
};

/// Pieces a frame is written in at most (header + frame segments); above that, copied.
const MAX_IOVECS: usize = 65;

/// What [`Tap::create`] sets up.
///
/// # Example
/// ```
/// use std::net::Ipv4Addr;
/// use smolvm::devices::virtio::net::TapConfig;
/// let cfg = TapConfig { ipv4: Some((Ipv4Addr::new(10, 0, 0, 1), 24)), ..Default::default() };
/// assert!(cfg.name.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapConfig {
    /// Interface name (1-15 bytes; may contain one `%d` for the kernel to number). `None`:
    /// `smolvm%d`.
    pub name: Option<String>,
    /// Host-side address and prefix length; `None`: no address.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// MTU; `None`: the kernel's default (1500).
    pub mtu: Option<u32>,
}

/// A TAP device opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a 12-byte
/// vnet header: the [`NetBackend`] for a [`Net`](super::Net) on Linux. One made by
/// [`Tap::create`] is non-persistent: it disappears when this value (its descriptor) is
/// dropped, so a stopped VM leaves no interface behind.
///
/// # Example
/// ```no_run
/// use std::net::Ipv4Addr;
/// use smolvm::devices::virtio::net::{Net, NetConfig, Tap, TapConfig};
/// let tap = Tap::create(&TapConfig {
///     ipv4: Some((Ipv4Addr::new(172, 16, 0, 1), 30)),
///     ..Default::default()
/// })?;
/// println!("guest reachable through {}", tap.name());
/// let net = Net::new(tap, NetConfig::default())?; // the interface goes away with `net`
/// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
/// ```
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ifreq.ifr_name` from `name`.
fn if_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], NetError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(NetError::InvalidName { name: name.into() });
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

fn ifreq(name: [libc::c_char; libc::IFNAMSIZ]) -> libc::ifreq {
    libc::ifreq {
        ifr_name: name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_ifindex: 0 },
    }
}

/// An IPv4 address as the `sockaddr` (really a `sockaddr_in`) the SIOCSIF* ioctls take.
fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (d, o) in data[2..6].iter_mut().zip(ip.octets()) {
        *d = o as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn ioctl_ifreq(fd: RawFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, initialised ifreq the kernel reads and may write (it is
    // exactly the argument type of every request this module passes), and it outlives the call.
    let r = unsafe { libc::ioctl(fd, req, ifr as *mut libc::ifreq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Any AF_INET socket carries the interface ioctls (the TAP descriptor does not).
fn config_socket(name: &str) -> Result<std::net::UdpSocket, NetError> {
    std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| NetError::Ioctl {
        name: name.into(),
        op: "creating a configuration socket",
        source: e,
    })
}

fn map_err(name: &str, op: &'static str, e: io::Error) -> NetError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => NetError::PermissionDenied { op, source: e },
        _ => NetError::Ioctl {
            name: name.into(),
            op,
            source: e,
        },
    }
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it (non-persistent) if it does not
    /// exist. A persistent interface made beforehand (`ip tuntap add ... mode tap vnet_hdr`)
    /// can be opened by an unprivileged user who owns it.
    ///
    /// # Errors
    /// [`NetError::TunUnavailable`], [`NetError::InvalidName`],
    /// [`NetError::PermissionDenied`], or [`NetError::Ioctl`] (e.g. `name` is another kind of
    /// interface, or a TAP already in use).
    ///
    /// # Example
    /// ```no_run
    /// let tap = smolvm::devices::virtio::net::Tap::open("tap0")?;
    /// assert_eq!(tap.name(), "tap0");
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let ifr_name = if_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => NetError::PermissionDenied {
                    op: "opening /dev/net/tun",
                    source: e,
                },
                _ => NetError::TunUnavailable { source: e },
            })?;
        let mut ifr = ifreq(ifr_name);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ioctl_ifreq(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr).map_err(|e| {
            let op = match e.raw_os_error() {
                Some(libc::EBUSY) => "TUNSETIFF (the TAP is in use by another process)",
                Some(libc::EINVAL) => "TUNSETIFF (an interface of another kind has this name?)",
                _ => "TUNSETIFF",
            };
            map_err(name, op, e)
        })?;
        let kernel_name: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0]) // c_char: i8 on x86_64, u8 on aarch64
            .collect();
        let name = String::from_utf8_lossy(&kernel_name).into_owned();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if r < 0 {
            return Err(map_err(
                &name,
                "TUNSETVNETHDRSZ",
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap { file, name };
        tap.set_tun_offload(0)
            .map_err(|e| map_err(&tap.name, "TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    /// Creates a non-persistent TAP (gone when this value is dropped), gives it the address
    /// and MTU of `cfg` and brings it up. Needs `CAP_NET_ADMIN`.
    ///
    /// # Errors
    /// As [`open`](Self::open); [`NetError::InvalidPrefix`]; [`NetError::PermissionDenied`]
    /// or [`NetError::Ioctl`] for the address, MTU or link state.
    ///
    /// # Example
    /// See [`Tap`].
    pub fn create(cfg: &TapConfig) -> Result<Tap, NetError> {
        if let Some((_, prefix)) = cfg.ipv4 {
            if prefix > 32 {
                return Err(NetError::InvalidPrefix(prefix));
            }
        }
        let tap = Tap::open(cfg.name.as_deref().unwrap_or("smolvm%d"))?;
        let sock = config_socket(&tap.name)?;
        let fd = sock.as_raw_fd();
        let name = if_name(&tap.name)?;
        let tap_name = tap.name.clone();
        let err = |op: &'static str| {
            let n = tap_name.clone();
            move |e| map_err(&n, op, e)
        };
        if let Some((ip, prefix)) = cfg.ipv4 {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let mut ifr = ifreq(name);
            ifr.ifr_ifru.ifru_addr = sockaddr(ip);
            ioctl_ifreq(fd, libc::SIOCSIFADDR as libc::Ioctl, &mut ifr)
                .map_err(err("setting the address (SIOCSIFADDR)"))?;
            let mut ifr = ifreq(name);
            ifr.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
            ioctl_ifreq(fd, libc::SIOCSIFNETMASK as libc::Ioctl, &mut ifr)
                .map_err(err("setting the netmask (SIOCSIFNETMASK)"))?;
        }
        if let Some(mtu) = cfg.mtu {
            let mut ifr = ifreq(name);
            ifr.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).unwrap_or(libc::c_int::MAX);
            ioctl_ifreq(fd, libc::SIOCSIFMTU as libc::Ioctl, &mut ifr)
                .map_err(err("setting the MTU (SIOCSIFMTU)"))?;
        }
        let mut ifr = ifreq(name);
        ioctl_ifreq(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut ifr)
            .map_err(err("reading the flags (SIOCGIFFLAGS)"))?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote `ifru_flags` (a plain c_short).
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl_ifreq(fd, libc::SIOCSIFFLAGS as libc::Ioctl, &mut ifr)
            .map_err(err("bringing the interface up (SIOCSIFFLAGS)"))?;
        Ok(tap)
    }

    /// The interface's name as the kernel knows it (with `%d` resolved).
    ///
    /// # Example
    /// See [`Tap`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index (what `AF_PACKET` sockets and routes name it by).
    ///
    /// # Errors
    /// [`NetError::Ioctl`] if the interface cannot be looked up.
    ///
    /// # Example
    /// ```no_run
    /// let tap = smolvm::devices::virtio::net::Tap::create(&Default::default())?;
    /// assert!(tap.if_index()? > 0);
    /// # Ok::<(), smolvm::devices::virtio::net::NetError>(())
    /// ```
    pub fn if_index(&self) -> Result<u32, NetError> {
        let mut ifr = ifreq(if_name(&self.name)?);
        let sock = config_socket(&self.name)?;
        ioctl_ifreq(
            sock.as_raw_fd(),
            libc::SIOCGIFINDEX as libc::Ioctl,
            &mut ifr,
        )
        .map_err(|e| map_err(&self.name, "SIOCGIFINDEX", e))?;
        // SAFETY: SIOCGIFINDEX succeeded, so the kernel wrote `ifru_ifindex` (a plain c_int).
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        Ok(u32::try_from(index).unwrap_or(0))
    }

    fn set_tun_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&mut self, frame: &TxFrame<'_>) -> io::Result<()> {
        let segs = frame.segments();
        if segs.len() + 1 > MAX_IOVECS {
            let v = frame.to_vec();
            return std::io::Write::write(&mut (&self.file), &v).map(|_| ());
        }
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; MAX_IOVECS];
        iov[0] = libc::iovec {
            iov_base: frame.header().as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        };
        for (v, s) in iov[1..].iter_mut().zip(segs) {
            *v = libc::iovec {
                iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            };
        }
        let count = segs.len() + 1;
        // SAFETY: the first `count` iovecs describe the header (borrowed by `frame`) and
        // host mappings of guest memory that `frame`'s slices borrow for its lifetime; writev
        // only reads them.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count as libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // A TAP takes a frame whole or not at all.
        Ok(())
    }

    fn fd(&self) -> Option<std::os::raw::c_int> {
        Some(self.file.as_raw_fd())
    }

    fn set_offloads(&mut self, guest_features: u64) -> io::Result<()> {
        let has = |bit: u32| guest_features & (1u64 << bit) != 0;
        let mut flags: libc::c_uint = 0;
        // The TAP only segments/checksums-offloads towards us when the guest can take it;
        // segmentation offloads need partial checksums.
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        match self.set_tun_offload(flags) {
            Err(e) if flags & libc::TUN_F_UFO != 0 => {
                // Kernels without UFO refuse the flag: the guest then just never gets UFO.
                log::debug!(
                    "TAP {}: UFO offload refused ({e}), retrying without",
                    self.name
                );
                self.set_tun_offload(flags & !libc::TUN_F_UFO)
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_say_what_to_do() {
        let e = map_err(
            "tap0",
            "TUNSETIFF",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert!(matches!(e, NetError::PermissionDenied { .. }));
        assert!(
            e.to_string().contains("needs CAP_NET_ADMIN (run as root"),
            "{e}"
        );
        let e = map_err(
            "tap0",
            "SIOCSIFMTU",
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert!(matches!(e, NetError::Ioctl { .. }));
        assert!(e.to_string().contains("tap0") && e.to_string().contains("SIOCSIFMTU"));
    }

    #[test]
    fn names_and_addresses_are_encoded_for_the_kernel() {
        let n = if_name("smolvm%d").unwrap();
        assert_eq!(
            n[..8]
                .iter()
                .map(|&c| c.to_ne_bytes()[0])
                .collect::<Vec<_>>(),
            b"smolvm%d"
        );
        assert!(n[8..].iter().all(|&c| c == 0), "NUL-terminated");
        assert!(if_name("fifteen-chars-x").is_ok());
        assert!(if_name("sixteen-chars-xx").is_err());
        let a = sockaddr(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(a.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(
            a.sa_data[..6]
                .iter()
                .map(|&c| c.to_ne_bytes()[0])
                .collect::<Vec<_>>(),
            [0, 0, 10, 1, 2, 3]
        );
    }
}

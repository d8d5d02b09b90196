//! [`NetDevice`]: what [`VmBuilder::net_device`](super::VmBuilder::net_device) attaches: a
//! virtio-net card and the host backend behind it.

use crate::devices::rate_limiter::RateLimit;
use crate::devices::virtio::net::{NetBackend, NetConfig};
#[cfg(target_os = "linux")]
use crate::devices::virtio::net::{Tap, TapConfig};

/// Where a [`NetDevice`]'s frames go.
pub(super) enum NetBackendSpec {
    /// A TAP the caller opened or created (and keeps owning through the VM).
    #[cfg(target_os = "linux")]
    Tap(Tap),
    /// An existing TAP interface, opened by name when the VM starts.
    #[cfg(target_os = "linux")]
    OpenTap(String),
    /// A TAP the VM creates when it starts and removes when it stops.
    #[cfg(target_os = "linux")]
    CreateTap(TapConfig),
    /// Any other backend (tests, userspace networking).
    Custom(Box<dyn NetBackend>),
}

/// A virtio-net device for [`VmBuilder::net_device`](super::VmBuilder::net_device): a backend
/// (a TAP device on Linux) plus the card's settings ([`NetConfig`]: MAC address, rate limits,
/// queue size).
///
/// Devices appear to the guest in the order they are added, after the block devices
/// (`eth0`, `eth1`, ...).
///
/// # Example
/// ```no_run
/// use std::net::Ipv4Addr;
/// use smolvm::devices::virtio::net::TapConfig;
/// use smolvm::NetDevice;
///
/// // A TAP created for this VM, 172.16.0.1/30 on the host side, removed when the VM stops.
/// let tap = TapConfig {
///     ipv4: Some((Ipv4Addr::new(172, 16, 0, 1), 30)),
///     ..Default::default()
/// };
/// let vm = smolvm::VmBuilder::new()
///     .kernel("vmlinux")
///     .net_device(NetDevice::create_tap(tap).mac([0x02, 0, 0, 0, 0, 1]))
///     .start()?;
/// println!("host side: {:?}", vm.net_interface_name(0)?);
/// # Ok::<(), smolvm::Error>(())
/// ```
pub struct NetDevice {
    pub(super) backend: NetBackendSpec,
    pub(super) config: NetConfig,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            #[cfg(target_os = "linux")]
            NetBackendSpec::Tap(t) => format!("tap {}", t.name()),
            #[cfg(target_os = "linux")]
            NetBackendSpec::OpenTap(n) => format!("open tap {n}"),
            #[cfg(target_os = "linux")]
            NetBackendSpec::CreateTap(c) => format!("create tap {c:?}"),
            NetBackendSpec::Custom(_) => "custom".to_string(),
        };
        f.debug_struct("NetDevice")
            .field("backend", &backend)
            .field("config", &self.config)
            .finish()
    }
}

impl NetDevice {
    fn with(backend: NetBackendSpec) -> Self {
        NetDevice {
            backend,
            config: NetConfig::default(),
        }
    }

    /// A TAP device the caller already opened ([`Tap::open`]) or created ([`Tap::create`]).
    /// The VM takes it over; a TAP made by [`Tap::create`] disappears when the VM stops.
    ///
    /// # Example
    /// ```no_run
    /// use smolvm::devices::virtio::net::Tap;
    /// let dev = smolvm::NetDevice::tap(Tap::open("tap0")?);
    /// # drop(dev);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(target_os = "linux")]
    pub fn tap(tap: Tap) -> Self {
        Self::with(NetBackendSpec::Tap(tap))
    }

    /// An existing TAP interface (`ip tuntap add dev tap0 mode tap user $USER`), opened when
    /// the VM starts; it outlives the VM. Needs no CAP_NET_ADMIN when the interface belongs
    /// to the caller's user.
    ///
    /// # Example
    /// ```
    /// let dev = smolvm::NetDevice::open_tap("tap0");
    /// # drop(dev);
    /// ```
    #[cfg(target_os = "linux")]
    pub fn open_tap(name: impl Into<String>) -> Self {
        Self::with(NetBackendSpec::OpenTap(name.into()))
    }

    /// A TAP device the VM creates when it starts (address, prefix and MTU from `config`,
    /// brought up) and removes when it stops, so no interface outlives the VM. Needs
    /// CAP_NET_ADMIN: without it [`VmBuilder::start`](super::VmBuilder::start) fails with an
    /// error that says so.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::net::TapConfig;
    /// let dev = smolvm::NetDevice::create_tap(TapConfig::default()); // smolvm0, smolvm1, ...
    /// # drop(dev);
    /// ```
    #[cfg(target_os = "linux")]
    pub fn create_tap(config: TapConfig) -> Self {
        Self::with(NetBackendSpec::CreateTap(config))
    }

    /// Any [`NetBackend`] (userspace networking, a test double).
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::net::MemBackend;
    /// let dev = smolvm::NetDevice::backend(Box::new(MemBackend::default()));
    /// # drop(dev);
    /// ```
    pub fn backend(backend: Box<dyn NetBackend>) -> Self {
        Self::with(NetBackendSpec::Custom(backend))
    }

    /// The guest's MAC address (default: a random locally administered unicast address).
    ///
    /// # Example
    /// ```
    /// let dev = smolvm::NetDevice::open_tap("tap0").mac([0x02, 0, 0, 0, 0, 7]);
    /// # drop(dev);
    /// ```
    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.config.mac = Some(mac);
        self
    }

    /// Limits what the guest receives (host → guest). Unlimited by default.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::rate_limiter::{BucketConfig, RateLimit};
    /// // 100 Mbit/s with a 1 MiB burst.
    /// let limit = RateLimit {
    ///     bytes: Some(BucketConfig { rate: 12_500_000, burst: 1 << 20 }),
    ///     ops: None,
    /// };
    /// let dev = smolvm::NetDevice::open_tap("tap0").rx_rate_limit(limit);
    /// # drop(dev);
    /// ```
    pub fn rx_rate_limit(mut self, limit: RateLimit) -> Self {
        self.config.rx_rate_limit = Some(limit);
        self
    }

    /// Limits what the guest sends (guest → host). Unlimited by default.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::rate_limiter::{BucketConfig, RateLimit};
    /// // 10,000 packets/s with a burst of 100.
    /// let limit = RateLimit { bytes: None, ops: Some(BucketConfig { rate: 10_000, burst: 100 }) };
    /// let dev = smolvm::NetDevice::open_tap("tap0").tx_rate_limit(limit);
    /// # drop(dev);
    /// ```
    pub fn tx_rate_limit(mut self, limit: RateLimit) -> Self {
        self.config.tx_rate_limit = Some(limit);
        self
    }

    /// Replaces all settings at once.
    ///
    /// # Example
    /// ```
    /// use smolvm::devices::virtio::net::NetConfig;
    /// let dev = smolvm::NetDevice::open_tap("tap0").config(NetConfig::default());
    /// # drop(dev);
    /// ```
    pub fn config(mut self, config: NetConfig) -> Self {
        self.config = config;
        self
    }
}

//! virtio-net end to end, inside throwaway network namespaces: the `virtio_net` tiny guest
//! (guest/tiny/virtio_net.S) drives the first virtio-mmio slot through the handshake, posts
//! receive buffers and echoes every frame back (destination := source, source := the device's
//! MAC), with QueueNotify going through ioeventfds to the device event loop and completions
//! coming back as interrupts.
//!
//! Each test makes its own namespace, creates the VM's TAP device inside it (a thread that
//! entered the namespace creates it; the descriptor keeps working from every thread) and
//! talks to it with an `AF_PACKET` socket bound to the TAP, so all traffic stays inside the
//! namespace, which is deleted at the end.

#[path = "common/harness.rs"]
mod harness;
#[path = "common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use harness::{builder_in, can_run, Console, TestPort, IRQCHIP_MODES};
use netns::{can_use_netns, NetNs, PacketSocket};
use smolvm::devices::virtio::net::{Tap, TapConfig};
use smolvm::hypervisor::IrqchipMode;
use smolvm::{NetDevice, VmHandle};

/// Guest runs in this file one at a time (the host emulates guest CPL0 code).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's MAC (set through the API, read by the guest from the config space).
const GUEST_MAC: [u8; 6] = [0x02, 0x53, 0x4d, 0x4f, 0x4c, 0x01];
/// Source MAC of the frames the test injects.
const PEER_MAC: [u8; 6] = [0x02, 0x53, 0x4d, 0x4f, 0x4c, 0xfe];
/// IEEE 802 "local experimental" Ethernet type: nothing in the namespace's stack answers it.
const ETHERTYPE: u16 = 0x88b5;
/// The guest reports this once its receive buffers are posted.
const READY: u32 = 0x100;
/// Guest buffer `i` is at `RX_BUFS + i * RX_BUF_LEN` and starts with the 12-byte header.
const RX_BUFS: u64 = 0x31_0000;
const RX_BUF_LEN: u64 = 2048;
const RX_BUF_COUNT: u64 = 8;
const NET_HDR_LEN: usize = 12;
/// Generous bound for anything that should take milliseconds (the host emulates guest CPL0
/// code, so guest steps are slow here).
const TIMEOUT: Duration = Duration::from_secs(20);

/// One test frame: to the guest, from the peer, `len` bytes in all with a pattern seeded by
/// `seed`.
fn frame(seed: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f
}

/// What the guest must send back for `sent`.
fn echo_of(sent: &[u8]) -> Vec<u8> {
    let mut e = sent.to_vec();
    e[..6].copy_from_slice(&PEER_MAC);
    e[6..12].copy_from_slice(&GUEST_MAC);
    e
}

fn wait_for_port(port: &TestPort, value: u32, console: &Console) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !port.values().contains(&value) {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never reported {value:#x}; console: {:?}, port: {:x?}",
            console.text(),
            port.values()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A namespace with the VM's TAP (`tap0`, 10.77.0.1/24, up) and a packet socket on it.
fn setup(tag: &str) -> (NetNs, Tap, PacketSocket) {
    let ns = NetNs::new(tag).expect("network namespace");
    let (tap, sock) = ns.run_in(|| {
        let tap = Tap::create(&TapConfig {
            name: Some("tap0".into()),
            ipv4: Some((Ipv4Addr::new(10, 77, 0, 1), 24)),
            ..Default::default()
        })
        .expect("create TAP in the namespace");
        let sock = PacketSocket::bind("tap0", ETHERTYPE).expect("packet socket on tap0");
        (tap, sock)
    });
    (ns, tap, sock)
}

fn start_echo_guest(tap: Tap, mode: IrqchipMode) -> (VmHandle, Console, TestPort) {
    let (b, console, port) = builder_in("virtio_net", mode);
    let vm = b
        .net_device(NetDevice::tap(tap).mac(GUEST_MAC))
        .start()
        .expect("start the echo guest");
    wait_for_port(&port, READY, &console);
    (vm, console, port)
}

/// Sends `frames` one at a time and checks each echo byte for byte.
fn echo_round_trips(sock: &PacketSocket, frames: &[Vec<u8>], console: &Console) {
    for sent in frames {
        sock.send(sent).expect("inject a frame on the TAP");
        let got = sock
            .recv_incoming(TIMEOUT)
            .expect("receive from the TAP")
            .unwrap_or_else(|| {
                panic!(
                    "no echo of a {}-byte frame; console: {:?}",
                    sent.len(),
                    console.text()
                )
            });
        assert_eq!(got.len(), sent.len(), "echo length");
        assert!(got == echo_of(sent), "echo differs from the frame sent");
    }
}

fn echo_test(mode: IrqchipMode, tag: &str) {
    let (ns, tap, sock) = setup(tag);
    let (vm, console, port) = start_echo_guest(tap, mode);
    let frames: Vec<Vec<u8>> = [60usize, 64, 100, 512, 1000, 1514]
        .iter()
        .enumerate()
        .map(|(i, &len)| frame(i as u8, len))
        .collect();
    echo_round_trips(&sock, &frames, &console);

    // Every frame landed in a receive buffer: the last one is still in one of the eight,
    // after a header with no offload metadata and num_buffers = 1 (virtio 1.2, 5.1.6.4).
    use vm_memory::Bytes;
    let last = frames.last().expect("frames");
    let mut want = vec![0u8; NET_HDR_LEN];
    want[10] = 1; // num_buffers (le16 at offset 10)
    want.extend_from_slice(last);
    let mem = vm.memory().expect("guest memory while running");
    let found = (0..RX_BUF_COUNT).any(|i| {
        let mut buf = vec![0u8; want.len()];
        mem.read_slice(&mut buf, vm_memory::GuestAddress(RX_BUFS + i * RX_BUF_LEN))
            .expect("read a guest receive buffer");
        if buf[NET_HDR_LEN..] == want[NET_HDR_LEN..] {
            assert_eq!(
                &buf[..NET_HDR_LEN],
                &want[..NET_HDR_LEN],
                "header of the received frame"
            );
            true
        } else {
            false
        }
    });
    assert!(found, "no receive buffer holds the last injected frame");

    // The guest reports each echo just after queueing it, so the last report may trail the
    // echo the test already received.
    let echo_reports = || {
        port.values()
            .into_iter()
            .filter(|v| v & 0xf00 == 0x200)
            .count()
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    while echo_reports() < frames.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(echo_reports(), frames.len(), "one echo report per frame");

    // The device counts a frame just after handing it over, so the counters may trail the
    // echo the test already read by a moment.
    let n = frames.len() as u64;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let stats = loop {
        let s = vm.net_stats(0).expect("stats of net device 0");
        if (s.rx_frames >= n && s.tx_frames >= n) || std::time::Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(stats.rx_frames >= n && stats.tx_frames >= n, "{stats:?}");
    assert_eq!(stats.tx_dropped(), 0, "{stats:?}");

    vm.stop();
    drop(vm);
    drop(sock);
    assert!(
        !ns.has_link("tap0"),
        "the VM's TAP outlived the VM: {:?}",
        ns.ip(&["link"])
    );
}

#[test]
fn guest_echoes_frames_from_the_namespace() {
    let _g = serial();
    if !can_run() || !can_use_netns() {
        return;
    }
    echo_test(IRQCHIP_MODES[0], "echo");
}

#[test]
fn guest_echoes_frames_with_split_irqchip() {
    let _g = serial();
    if !can_run() || !can_use_netns() {
        return;
    }
    echo_test(IrqchipMode::Split, "echo-split");
}

/// A VM that creates its own TAP owns it: the interface exists while the VM runs and is gone
/// after `stop()`.
#[test]
fn vm_created_tap_is_removed_when_the_vm_stops() {
    let _g = serial();
    if !can_run() || !can_use_netns() {
        return;
    }
    let ns = NetNs::new("owned").expect("network namespace");
    let vm = ns.run_in(|| {
        let (b, _console, _port) = builder_in("halt", IrqchipMode::Split);
        b.net_device(NetDevice::create_tap(TapConfig {
            name: Some("vmtap0".into()),
            ipv4: Some((Ipv4Addr::new(10, 78, 0, 1), 24)),
            ..Default::default()
        }))
        .start()
        .expect("start with a VM-created TAP")
    });
    let link = ns
        .ip(&["-4", "addr", "show", "dev", "vmtap0"])
        .expect("vmtap0 exists");
    assert!(link.contains("10.78.0.1/24"), "address set: {link}");
    assert!(link.contains("UP"), "interface up: {link}");
    assert_eq!(
        vm.net_interface_name(0).expect("interface name").as_deref(),
        Some("vmtap0")
    );
    vm.stop();
    drop(vm);
    assert!(!ns.has_link("vmtap0"), "the VM's TAP outlived the VM");
}

/// A guest that never posts receive buffers: frames injected on the TAP are held back
/// (back-pressure, counted), the VM keeps running, and nothing spins.
#[test]
fn frames_for_a_guest_without_receive_buffers_are_held_back() {
    let _g = serial();
    if !can_run() || !can_use_netns() {
        return;
    }
    let (_ns, tap, sock) = setup("nobufs");
    let (b, console, _port) = builder_in("halt", IrqchipMode::Split);
    let vm = b
        .net_device(NetDevice::tap(tap).mac(GUEST_MAC))
        .start()
        .expect("start");
    assert!(
        console.wait_for("halting\n", TIMEOUT),
        "{:?}",
        console.text()
    );
    let before = device_loop_cpu_ticks();
    for i in 0..64u8 {
        sock.send(&frame(i, 200)).expect("inject");
    }
    std::thread::sleep(Duration::from_millis(500));
    let used = device_loop_cpu_ticks() - before;
    assert_eq!(vm.state(), smolvm::VmState::Running);
    // A loop spinning on the TAP would burn the whole half second (50 ticks at 100 Hz);
    // serving 64 readiness reports takes well under one tick.
    assert!(
        used < 25,
        "the device loop used {used} CPU ticks in 500 ms: it spins"
    );
    let stats = vm.net_stats(0).expect("stats");
    assert_eq!(
        stats.rx_frames, 0,
        "no frame can reach a driver-less guest: {stats:?}"
    );
    vm.stop();
}

/// CPU time (user + system, in clock ticks) of this process's `smolvm-devices` threads.
fn device_loop_cpu_ticks() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "smolvm-devices" {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total
}

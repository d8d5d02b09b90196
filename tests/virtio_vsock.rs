//! virtio-vsock end to end: the `virtio_vsock` tiny guest (guest/tiny/virtio_vsock.S) is a
//! vsock driver that accepts every connection and echoes every byte, and dials host port
//! 9999 once after its first accepted connection. Packets cross real MMIO exits, ioeventfds
//! and irqfds; the host side is the in-process API of `VmHandle` and the Firecracker-style
//! Unix socket.

#[path = "common/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use harness::{builder_in, can_run, Console, TestPort};
use smolvm::devices::virtio::vsock::VsockConfig;
use smolvm::hypervisor::IrqchipMode;
use smolvm::VmHandle;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const GUEST_CID: u64 = 42;
const READY: u32 = 0x100;
/// The guest reports `0x400 | op` for every packet it receives.
const GOT_SHUTDOWN: u32 = 0x404;
/// The port the guest dials once, from guest port 1024.
const DIAL_PORT: u32 = 9999;
const DIAL_SRC_PORT: u32 = 1024;
const TIMEOUT: Duration = Duration::from_secs(20);

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

fn start(mode: IrqchipMode, config: VsockConfig) -> (VmHandle, Console, TestPort) {
    let (b, console, port) = builder_in("virtio_vsock", mode);
    let vm = b.vsock(config).start().expect("start the vsock echo guest");
    wait_for_port(&port, READY, &console);
    (vm, console, port)
}

/// Writes `data` from a second thread while reading the echo here; returns what came back.
fn echo(stream: &UnixStream, data: &[u8]) -> Vec<u8> {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let sent = data.to_vec();
    let t = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    let mut reader = stream;
    reader.read_exact(&mut back).expect("read the echo");
    t.join()
        .expect("writer thread")
        .expect("write to the guest");
    back
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn in_process_round_trips(mode: IrqchipMode) {
    let (vm, console, port) = start(mode, VsockConfig::new(GUEST_CID));
    assert_eq!(vm.vsock_cid().expect("cid"), Some(GUEST_CID));
    let listener = vm
        .vsock_listen(DIAL_PORT)
        .expect("listen for the guest's dial");

    let s = vm
        .vsock_connect(1234, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect: {e}; console {:?}", console.text()));
    assert_eq!(echo(&s, b"hello vsock"), b"hello vsock");
    // More than the guest's 4 KiB receive buffers and several times its 64 KiB credit: the
    // device must split, and wait for the guest's fwd_cnt to move.
    let big = pattern(300 * 1024, 7);
    assert!(echo(&s, &big) == big, "300 KiB echo differs");

    // The guest dialed host port 9999 after accepting the first connection.
    let (g, guest_port) = listener.accept_timeout(TIMEOUT).expect("the guest's dial");
    assert_eq!(guest_port, DIAL_SRC_PORT);
    assert_eq!(echo(&g, b"ping from the host"), b"ping from the host");

    // Closing the host end sends SHUTDOWN to the guest (which answers RST).
    drop(s);
    wait_for_port(&port, GOT_SHUTDOWN, &console);
    drop(g);
    vm.stop();
}

#[test]
fn in_process_connect_listen_and_echo() {
    let _g = serial();
    if !can_run() {
        return;
    }
    in_process_round_trips(IrqchipMode::InKernel);
}

#[test]
fn in_process_connect_listen_and_echo_split_irqchip() {
    let _g = serial();
    if !can_run() {
        return;
    }
    in_process_round_trips(IrqchipMode::Split);
}

/// The Firecracker-compatible socket: `CONNECT <port>\n` → `OK <host port>\n`, then a byte
/// stream to the guest port.
#[test]
fn unix_socket_connect_protocol() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("smolvm-vsock-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("v.sock");
    let (vm, _console, _port) = start(
        IrqchipMode::Split,
        VsockConfig::new(GUEST_CID).uds_path(&path),
    );
    let mut c = UnixStream::connect(&path).expect("connect to the vsock socket");
    c.write_all(b"CONNECT 5000\n").expect("CONNECT line");
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).expect("OK line");
    let host_port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("expected `OK <port>`, got {line:?}"));
    assert!(host_port > 0);
    assert_eq!(
        echo(&c, b"through the socket file"),
        b"through the socket file"
    );
    drop(c);
    vm.stop();
    drop(vm);
    assert!(!path.exists(), "the socket file outlived the VM");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without a vsock device the agent calls fail with a configuration error that says what to
/// add, not a hang.
#[test]
fn agent_calls_without_vsock_are_a_config_error() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (b, console, _port) = builder_in("halt", IrqchipMode::Split);
    let vm = b.start().expect("start");
    assert!(console.wait_for("halting\n", TIMEOUT));
    let err = vm
        .exec(&smolvm::agent::Command::new("true"))
        .expect_err("no vsock device");
    assert!(
        matches!(err, smolvm::Error::Config(ref m) if m.contains("VmBuilder::vsock")),
        "{err}"
    );
    vm.stop();
}

/// Something answers on the agent port but is not the agent (the echo guest sends our own
/// handshake back): `wait_agent_ready` keeps trying, then reports `NotReady` with the last
/// failure instead of hanging or accepting it.
#[test]
fn wait_agent_ready_rejects_a_non_agent_and_times_out() {
    let _g = serial();
    if !can_run() {
        return;
    }
    let (vm, _console, _port) = start(IrqchipMode::Split, VsockConfig::new(GUEST_CID));
    let err = vm
        .wait_agent_ready(Duration::from_millis(500))
        .expect_err("the echo guest is not an agent");
    match err {
        smolvm::Error::Agent(e) => assert!(
            matches!(*e, smolvm::agent::AgentError::NotReady { .. }),
            "{e}"
        ),
        other => panic!("expected an agent error, got {other}"),
    }
    vm.stop();
}

//! The guest agent run as a host process on a Unix socket (same binary, same protocol code as
//! in a guest; only the transport differs), driven through `smolvm::agent::AgentClient` and by
//! hand with raw frames.

#[path = "common/agent.rs"]
mod host_agent;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use host_agent::HostAgent;
use smolvm::agent::protocol::{
    self, decode_response, encode_data, kind, read_frame, ExecRequest, Request, Response,
    MAX_CHUNK, MAX_FRAME_LEN,
};
use smolvm::agent::{wait_ready, AgentError, Command, ErrorCode, ExecEvent, ExitStatus};

/// Deterministic pseudo-random bytes (xorshift64*), every byte value likely present.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// FNV-1a 64: a checksum independent of byte-for-byte comparison code paths.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
    })
}

fn sh(script: &str) -> Command {
    Command::new("sh").arg("-c").arg(script)
}

#[test]
fn ping_reports_versions() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    assert_eq!(c.protocol_version(), protocol::PROTOCOL_VERSION);
    assert!(!c.agent_version().is_empty());
    let info = c.ping().unwrap();
    assert_eq!(info.protocol_version, protocol::PROTOCOL_VERSION);
    assert_eq!(info.agent_version, c.agent_version());
    assert!(info.uptime_ms > 0);
}

#[test]
fn large_output_on_both_streams() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let out = c
        .exec(&sh(
            "head -c 1048576 /dev/zero | tr '\\0' e >&2; head -c 8388608 /dev/zero | tr '\\0' o",
        ))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(out.stdout.len(), 8 << 20);
    assert!(out.stdout.iter().all(|&b| b == b'o'));
    assert_eq!(out.stderr.len(), 1 << 20);
    assert!(out.stderr.iter().all(|&b| b == b'e'));
}

#[test]
fn output_streams_in_chunks_in_order() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let mut events = Vec::new();
    let status = c
        .exec_streaming(
            &sh("echo first; sleep 0.2; echo second >&2; head -c 300000 /dev/zero"),
            |ev| {
                events.push(match ev {
                    ExecEvent::Stdout(b) => (1, b.to_vec()),
                    ExecEvent::Stderr(b) => (2, b.to_vec()),
                })
            },
        )
        .unwrap();
    assert!(status.success());
    assert_eq!(events[0], (1, b"first\n".to_vec()));
    assert_eq!(events[1], (2, b"second\n".to_vec()));
    let zeros: usize = events[2..].iter().map(|(_, b)| b.len()).sum();
    assert_eq!(zeros, 300000);
    assert!(
        events.len() >= 2 + 300000 / MAX_CHUNK,
        "output must arrive in chunks"
    );
    assert!(events.iter().all(|(_, b)| b.len() <= MAX_CHUNK));
}

#[test]
fn binary_stdin_round_trips_through_cat() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let data = noise((3 << 20) + 17, 7);
    let out = c.exec(&Command::new("cat").stdin(data.clone())).unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat output differs from its input");
    // Stdin the command never reads must not hang or break anything.
    let out = c
        .exec(&Command::new("true").stdin(vec![1; 4 << 20]))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Exited(0));
    let out = c
        .exec(&Command::new("wc").arg("-c").stdin(vec![0; 12345]))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "12345");
    // No stdin: the command sees end of file at once.
    let out = c.exec(&Command::new("cat")).unwrap();
    assert!(out.stdout.is_empty());
}

#[test]
fn missing_command_is_a_remote_error_and_the_connection_survives() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    match c.exec(&Command::new("smolvm-no-such-command")) {
        Err(AgentError::Remote {
            code,
            errno,
            message,
        }) => {
            assert_eq!(code, ErrorCode::SPAWN_FAILED);
            assert_eq!(errno, libc::ENOENT);
            assert!(message.contains("smolvm-no-such-command"), "{message}");
        }
        other => panic!("expected a spawn failure, got {other:?}"),
    }
    match c.exec(&Command::new("true").cwd("/smolvm/no/such/dir")) {
        Err(AgentError::Remote { code, errno, .. }) => {
            assert_eq!(code, ErrorCode::SPAWN_FAILED);
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("expected a spawn failure, got {other:?}"),
    }
    let out = c.exec(&Command::new("echo").arg("still here")).unwrap();
    assert_eq!(out.stdout, b"still here\n");
}

#[test]
fn exit_codes_signals_env_and_cwd() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    assert_eq!(c.exec(&sh("exit 7")).unwrap().status, ExitStatus::Exited(7));
    assert_eq!(c.exec(&sh("exit 0")).unwrap().status, ExitStatus::Exited(0));
    assert_eq!(
        c.exec(&sh("kill -TERM $$")).unwrap().status,
        ExitStatus::Signaled(libc::SIGTERM)
    );
    assert_eq!(
        c.exec(&sh("kill -KILL $$")).unwrap().status,
        ExitStatus::Signaled(libc::SIGKILL)
    );
    let out = c
        .exec(
            &sh("echo \"$FOO\"; pwd")
                .env("FOO", "bar baz")
                .cwd(&agent.dir),
        )
        .unwrap();
    let expected = format!("bar baz\n{}\n", agent.dir.canonicalize().unwrap().display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    let out = c
        .exec(&Command::new("/usr/bin/env").env_clear().env("ONLY", "1"))
        .unwrap();
    assert_eq!(out.stdout, b"ONLY=1\n");
}

fn gone(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    // A zombie is dead; whether it is reaped yet depends on the host's init.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let pids = agent.dir.join("pids");
    let script = format!(
        "sleep 100 & echo $! >> {p}; sleep 100 & echo $! >> {p}; echo $$ >> {p}; echo started; wait",
        p = pids.display()
    );
    let out = c
        .exec(&sh(&script).timeout(Duration::from_millis(1000)))
        .unwrap();
    assert_eq!(out.status, ExitStatus::TimedOut);
    assert_eq!(out.stdout, b"started\n");
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while !gone(pid) {
            assert!(
                Instant::now() < deadline,
                "process {pid} survived the timeout"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // The connection is fine afterwards.
    assert!(c.exec(&Command::new("true")).unwrap().status.success());
}

#[test]
fn concurrent_execs_on_separate_connections() {
    let agent = HostAgent::start();
    std::thread::scope(|s| {
        for t in 0..16 {
            let agent = &agent;
            s.spawn(move || {
                let mut c = agent.connect();
                for i in 0..5 {
                    let stdin = noise(10_000 + t * 100 + i, (t * 31 + i) as u64);
                    let out = c
                        .exec(
                            &sh("cat; echo \"$0 $1\" >&2")
                                .arg(t.to_string())
                                .arg(i.to_string())
                                .stdin(stdin.clone()),
                        )
                        .unwrap();
                    assert!(out.status.success());
                    assert!(out.stdout == stdin);
                    assert_eq!(out.stderr, format!("{t} {i}\n").into_bytes());
                }
            });
        }
    });
}

#[test]
fn file_copy_round_trip_with_checksum() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let data = noise((3 << 20) + 123, 99);
    let remote = agent.dir.join("in.bin");
    let remote_s = remote.to_str().unwrap();
    assert_eq!(
        c.write_file(remote_s, &data, 0o640).unwrap(),
        data.len() as u64
    );
    // The agent runs on this host: the file on disk is the guest's file.
    let on_disk = std::fs::read(&remote).unwrap();
    assert_eq!(fnv(&on_disk), fnv(&data));
    assert_eq!(
        std::fs::metadata(&remote).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let back = c.read_file(remote_s).unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(fnv(&back), fnv(&data));
    // Overwrite atomically, smaller, different mode.
    c.write_file(remote_s, b"short", 0o600).unwrap();
    assert_eq!(c.read_file(remote_s).unwrap(), b"short");
    assert_eq!(
        std::fs::metadata(&remote).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    // Path variants, and an empty file.
    let local_src = agent.dir.join("local-src.bin");
    let local_dst = agent.dir.join("local-dst.bin");
    std::fs::write(&local_src, &data).unwrap();
    let remote2 = agent.dir.join("in2.bin");
    let remote2_s = remote2.to_str().unwrap();
    assert_eq!(
        c.copy_in(&local_src, remote2_s, 0o755).unwrap(),
        data.len() as u64
    );
    assert_eq!(
        c.copy_out(remote2_s, &local_dst).unwrap(),
        data.len() as u64
    );
    assert_eq!(fnv(&std::fs::read(&local_dst).unwrap()), fnv(&data));
    let empty = agent.dir.join("empty");
    c.write_file(empty.to_str().unwrap(), b"", 0o644).unwrap();
    assert_eq!(c.read_file(empty.to_str().unwrap()).unwrap(), b"");
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&agent.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("smolvm-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn file_errors_are_remote_errors() {
    let agent = HostAgent::start();
    let mut c = agent.connect();
    let missing = agent.dir.join("missing");
    match c.read_file(missing.to_str().unwrap()) {
        Err(AgentError::Remote { code, errno, .. }) => {
            assert_eq!(code, ErrorCode::IO);
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("{other:?}"),
    }
    match c.read_file(agent.dir.to_str().unwrap()) {
        Err(AgentError::Remote { code, .. }) => assert_eq!(code, ErrorCode::INVALID_ARGUMENT),
        other => panic!("{other:?}"),
    }
    let no_dir = agent.dir.join("no/such/dir/f");
    match c.write_file(no_dir.to_str().unwrap(), &[5; 200_000], 0o644) {
        Err(AgentError::Remote { code, errno, .. }) => {
            assert_eq!(code, ErrorCode::IO);
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.write_file("relative/path", b"x", 0o644),
        Err(AgentError::Invalid(_))
    ));
    // All of the above left the connection usable.
    assert_eq!(
        c.exec(&Command::new("echo").arg("ok")).unwrap().stdout,
        b"ok\n"
    );
}

// --- raw protocol -----------------------------------------------------------------------------

fn send(s: &mut UnixStream, req: &Request) {
    let mut w = Vec::new();
    req.encode(&mut w);
    s.write_all(&w).unwrap();
}

fn recv(s: &mut UnixStream) -> Option<Response> {
    let mut buf = Vec::new();
    read_frame(s, &mut buf)
        .unwrap()
        .map(|t| decode_response(t, &buf).unwrap())
}

fn expect_error(s: &mut UnixStream, code: ErrorCode) {
    match recv(s) {
        Some(Response::Error(e)) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected error {code}, got {other:?}"),
    }
}

fn hello(s: &mut UnixStream) {
    send(
        s,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
        },
    );
    assert!(matches!(
        recv(s),
        Some(Response::HelloOk { version: 1, .. })
    ));
}

fn expect_pong(s: &mut UnixStream) {
    send(s, &Request::Ping);
    assert!(matches!(recv(s), Some(Response::Pong(_))));
}

fn expect_closed(s: &mut UnixStream) {
    let mut b = [0u8; 16];
    assert_eq!(
        s.read(&mut b).unwrap(),
        0,
        "agent should close the connection"
    );
}

#[test]
fn malformed_and_oversized_messages() {
    let mut agent = HostAgent::start();

    // Requests before Hello, and a version range the agent does not speak.
    let mut s = agent.raw();
    send(&mut s, &Request::Ping);
    expect_error(&mut s, ErrorCode::UNEXPECTED);
    send(
        &mut s,
        &Request::Hello {
            min_version: 5,
            max_version: 9,
        },
    );
    expect_error(&mut s, ErrorCode::VERSION_MISMATCH);
    hello(&mut s);

    // Unknown type, bad payloads: an error each, and the connection stays in step.
    let mut w = Vec::new();
    encode_data(0x3E, b"whatever", &mut w);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::UNKNOWN_MESSAGE);
    let mut w = Vec::new();
    Request::Exec(ExecRequest {
        argv: vec![b"true".to_vec()],
        ..Default::default()
    })
    .encode(&mut w);
    let cut = w.len() - 3;
    w.truncate(cut);
    w[..4].copy_from_slice(&((cut - 4) as u32).to_le_bytes());
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::MALFORMED);
    let mut w = Vec::new();
    encode_data(kind::PING, b"trailing", &mut w);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::MALFORMED);
    let mut exec = vec![0u8; 17]; // timeout, stdin length, flags
    exec.extend_from_slice(&u32::MAX.to_le_bytes()); // argc
    let mut w = Vec::new();
    encode_data(kind::EXEC, &exec, &mut w);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::TOO_LARGE);
    exec[16] = 0xff; // unknown flag bits
    let mut w = Vec::new();
    encode_data(kind::EXEC, &exec, &mut w);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::INVALID_ARGUMENT);
    let mut w = Vec::new();
    encode_data(kind::DATA, &vec![0; MAX_CHUNK + 1], &mut w);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::TOO_LARGE);
    // An exec whose stdin is interrupted by another request: the exec is abandoned.
    send(
        &mut s,
        &Request::Exec(ExecRequest {
            argv: vec![b"cat".to_vec()],
            stdin_len: 10,
            ..Default::default()
        }),
    );
    send(&mut s, &Request::Data(b"12345".to_vec()));
    send(&mut s, &Request::Ping);
    expect_error(&mut s, ErrorCode::UNEXPECTED);
    // More data than announced.
    send(
        &mut s,
        &Request::Exec(ExecRequest {
            argv: vec![b"cat".to_vec()],
            stdin_len: 3,
            ..Default::default()
        }),
    );
    send(&mut s, &Request::Data(b"12345".to_vec()));
    expect_error(&mut s, ErrorCode::UNEXPECTED);
    // Stray data frames are dropped silently.
    send(&mut s, &Request::Data(b"stray".to_vec()));
    expect_pong(&mut s);

    // An oversized frame header: an error, then the agent closes (it cannot resynchronise).
    let mut s = agent.raw();
    hello(&mut s);
    let mut w = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
    w.push(kind::DATA);
    s.write_all(&w).unwrap();
    expect_error(&mut s, ErrorCode::TOO_LARGE);
    expect_closed(&mut s);

    // A zero-length frame, the same.
    let mut s = agent.raw();
    s.write_all(&[0, 0, 0, 0]).unwrap();
    expect_error(&mut s, ErrorCode::MALFORMED);
    expect_closed(&mut s);

    // Garbage, then a hang-up inside a frame.
    let mut s = agent.raw();
    s.write_all(&[0x10, 0, 0, 0, 0x03, 1, 2]).unwrap();
    drop(s);
    let mut s = agent.raw();
    s.write_all(&protocol_noise()).unwrap();
    drop(s);

    // The agent survived all of it and serves new connections.
    assert!(agent.alive());
    let mut c = agent.connect();
    assert_eq!(
        c.exec(&Command::new("echo").arg("alive")).unwrap().stdout,
        b"alive\n"
    );
    assert!(agent.alive());
}

/// Random bytes that start with a plausible small frame header.
fn protocol_noise() -> Vec<u8> {
    let mut v = vec![0x40, 0, 0, 0, kind::EXEC];
    v.extend(noise(4096, 3));
    v
}

#[test]
fn wait_ready_gives_up_with_not_ready() {
    let dir = std::env::temp_dir().join(format!("smolvm-agent-none-{}", std::process::id()));
    let r = wait_ready(
        || UnixStream::connect(dir.join("nothing.sock")),
        Duration::from_millis(100),
    );
    match r {
        Err(AgentError::NotReady { last, .. }) => assert!(matches!(*last, AgentError::Io(_))),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

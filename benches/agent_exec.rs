//! Guest-agent exec round trip with the agent run as a host process on a Unix socket (the same
//! binary and protocol code as in a guest; the transport is a Unix socket instead of vsock):
//!
//! - `exec_true`: `exec(true)` over one open connection: request, fork/exec, wait, exit frame.
//! - `connect_handshake_exec_true`: a fresh connection, version handshake, then `exec(true)`.
//! - `ping`: a protocol round trip without a process, for the transport's share.
//!
//! Run with `cargo bench --bench agent_exec -- --warm-up-time 1 --measurement-time 3`. Builds
//! the agent in release mode first. Needs no KVM.

#[path = "../tests/common/agent.rs"]
mod host_agent;

use std::os::unix::net::UnixStream;

use criterion::{criterion_group, criterion_main, Criterion};
use smolvm::agent::{AgentClient, Command};

fn bench(c: &mut Criterion) {
    let agent = host_agent::HostAgent::start_with(true);
    let mut client = agent.connect();
    let cmd = Command::new("true");
    let mut g = c.benchmark_group("agent");
    g.bench_function("ping", |b| b.iter(|| client.ping().unwrap()));
    g.bench_function("exec_true", |b| {
        b.iter(|| {
            let out = client.exec(&cmd).unwrap();
            assert!(out.status.success());
        })
    });
    g.bench_function("connect_handshake_exec_true", |b| {
        b.iter(|| {
            let mut c = AgentClient::new(UnixStream::connect(&agent.sock).unwrap()).unwrap();
            assert!(c.exec(&cmd).unwrap().status.success());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The vsock Unix listener when the process runs out of file descriptors: the waiting client
//! is refused (closed) instead of left in the backlog, where it would keep the listener
//! readable and the device event loop spinning. Its own test binary, because it lowers the
//! process's descriptor limit.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use smolvm::devices::virtio::vsock::{Vsock, VsockConfig};
use smolvm::devices::virtio::{HostInterest, VirtioDevice};

fn readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn out_of_descriptors_refuses_the_client_and_does_not_spin() {
    let dir = std::env::temp_dir().join(format!("smolvm-vsock-emfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let mut vsock = Vsock::new(VsockConfig::new(3).uds_path(&path)).expect("vsock");
    let events = vsock.host_events();
    assert_eq!(events.len(), 1);
    let (epoll_fd, token) = (events[0].fd, events[0].token);

    // Fill the descriptor table up to a lowered limit, then free exactly one slot for the
    // client: afterwards the process has no descriptor to spare.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let new_limit = 256.min(lim.rlim_cur);
    let lowered = libc::rlimit {
        rlim_cur: new_limit,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    let mut hogs = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hogs.push(f);
    }
    assert!(!hogs.is_empty());
    hogs.pop();
    let mut client = UnixStream::connect(&path).expect("client connects (backlog)");
    assert!(readable(epoll_fd), "the listener has a client waiting");

    let more = vsock.host_event(token, HostInterest::READABLE);
    assert!(!more);
    assert!(
        !readable(epoll_fd),
        "the muxer is still readable after serving: the device loop would spin"
    );
    // The client was refused: end of file, no OK line.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        client.read(&mut buf).expect("read"),
        0,
        "refused clients see EOF"
    );

    drop(hogs);
    // SAFETY: restore the original limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    drop(vsock);
    let _ = std::fs::remove_dir_all(&dir);
}

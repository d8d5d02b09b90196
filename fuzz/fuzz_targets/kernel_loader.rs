//! Kernel images from an untrusted source: the input is written to a file and loaded with
//! `smolvm::boot::load_kernel` into 32 MiB of guest memory. It must return `Ok` or a
//! `BootError`, never panic, allocate without bound or write outside guest memory. Images that
//! load are then given to `configure_system` (default command line, 1 to 255 vCPUs taken from
//! the input's last byte, so the MP table's limit is crossed too), which must also return
//! `Ok` or a `BootError`.
//!
//! Seeds (`fuzz/seeds/kernel_loader/`): a minimal x86_64 ELF, the same with a PVH note, and a
//! minimal bzImage header, so the fuzzer starts past the magic checks.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smolvm::arch::x86_64::{configure_system, mptable};
use smolvm::boot::{load_kernel, BootError, KernelCmdline};
use smolvm::memory::GuestMemory;
use vm_memory::GuestAddress;

const MEM_SIZE: usize = 32 << 20;

/// One guest memory for the whole run (the loader does not need it zeroed) and one scratch
/// file per process, on tmpfs when there is one.
fn state() -> &'static (GuestMemory, PathBuf) {
    static STATE: OnceLock<(GuestMemory, PathBuf)> = OnceLock::new();
    STATE.get_or_init(|| {
        let mem = smolvm::memory::create(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let dir = ["/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .find(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("smolvm-fuzz-kernel-{}", std::process::id()));
        (mem, path)
    })
}

fuzz_target!(|data: &[u8]| {
    let (mem, path) = state();
    std::fs::write(path, data).expect("writing the scratch kernel file");
    let kernel = match load_kernel(mem, path) {
        Ok(k) => k,
        Err(
            BootError::KernelFile { .. }
            | BootError::KernelFormat { .. }
            | BootError::MemoryTooSmall { .. },
        ) => return,
        Err(e) => panic!("unexpected error from load_kernel: {e:?}"),
    };
    assert!(kernel.end <= MEM_SIZE as u64, "{kernel:?} ends past RAM");
    let vcpus = 1 + u32::from(data.last().copied().unwrap_or(0) % 255);
    match configure_system(mem, &kernel, &KernelCmdline::default(), None, vcpus) {
        Ok(_) => assert!(vcpus <= mptable::MAX_VCPUS),
        Err(BootError::TooManyVcpus(n)) => assert!(n == vcpus && n > mptable::MAX_VCPUS),
        Err(e) => panic!("unexpected error from configure_system: {e:?}"),
    }
});

#!/usr/bin/env python3
"""Measures the release `boot_alpine` process end to end on a tiny guest.

Workload (the same one Firecracker's numbers in README.md use): process start -> VM built ->
tiny ELF guest prints over the serial port -> i8042 reset -> VM torn down -> process exit.
Reports the median wall time, median CPU time (user + system) and the peak RSS of N runs.

    python3 scripts/measure-process.py [--runs 20] [--mem 128] [--guest hello]

It builds the example in release mode and the guest from guest/tiny/ with gcc (the same
flags as tests/common/guests.rs).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-nostdlib", "-static", "-no-pie", "-fno-pic", "-ffreestanding",
         "-mgeneral-regs-only", "-mno-red-zone", "-mno-sse", "-O2",
         "-Wl,--build-id=none", "-Wl,-z,noexecstack"]


def build_guest(name, out_dir):
    src = os.path.join(ROOT, "guest", "tiny")
    out = os.path.join(out_dir, name + ".elf")
    subprocess.run(["gcc", *FLAGS, "-Wl,-T," + os.path.join(src, "link.ld"), "-I", src,
                    "-o", out, os.path.join(src, name + ".S")], check=True)
    return out


# A tiny C launcher: a child's ru_maxrss includes the memory of whatever it was forked from
# (the pre-exec image), so forking from Python (~10 MiB) would inflate the figure. The
# launcher is a few hundred KiB; it times one run with fork+exec+wait4 and prints
# "wall_ns cpu_us maxrss_kib exit_status".
LAUNCHER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    struct timespec a, b;
    struct rusage ru;
    int status;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        execv(argv[2], argv + 2);
        _exit(127);
    }
    wait4(pid, &status, 0, &ru);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long long ns = (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
    long long cpu = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL
                  + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
    printf("%lld %lld %ld %d\n", ns, cpu, ru.ru_maxrss, status);
    return 0;
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--guest", default="hello_min")
    ap.add_argument("--irqchip", default="in-kernel", choices=["in-kernel", "split"])
    a = ap.parse_args()

    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "boot_alpine"],
                   cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "examples", "boot_alpine")
    with tempfile.TemporaryDirectory() as tmp:
        guest = build_guest(a.guest, tmp)
        launcher = os.path.join(tmp, "launch")
        with open(launcher + ".c", "w") as f:
            f.write(LAUNCHER_C)
        subprocess.run(["gcc", "-O2", "-static", "-o", launcher, launcher + ".c"], check=True)
        out_file = os.path.join(tmp, "out")
        argv = [launcher, out_file, binary, "--kernel", guest, "--mem", str(a.mem),
                "--irqchip", a.irqchip]
        env = dict(os.environ, SMOLVM_LOG="off")
        walls, cpus, rss = [], [], []
        for _ in range(a.runs + 2):
            r = subprocess.run(argv, env=env, capture_output=True, check=True, text=True)
            ns, cpu_us, maxrss_kib, status = (int(x) for x in r.stdout.split())
            out = open(out_file, "rb").read()
            if status != 0 or b"Hello from smolvm!" not in out:
                sys.exit(f"run failed: status {status}, output {out!r}")
            walls.append(ns / 1e6)
            cpus.append(cpu_us / 1e3)
            rss.append(maxrss_kib / 1024)
        # The first two runs warm the page cache; report the rest.
        walls, cpus, rss = walls[2:], cpus[2:], rss[2:]
    print(f"runs={a.runs} guest={a.guest} mem={a.mem}MiB irqchip={a.irqchip}")
    print(f"wall  median {statistics.median(walls):.2f} ms (min {min(walls):.2f}, max {max(walls):.2f})")
    print(f"cpu   median {statistics.median(cpus):.2f} ms (user+sys)")
    print(f"rss   max    {max(rss):.2f} MiB (median {statistics.median(rss):.2f})")


if __name__ == "__main__":
    main()

"""Does ``torch.set_num_threads`` in one thread change other threads' OpenMP teams? (issue 30)

Thread A sets N_A, then thread B sets N_B; then each runs matrix products while the CPU time
of every other OS thread of the process is read from /proc: a thread that gained CPU time was
one of the runner's OpenMP helpers. Printed per runner: (torch.get_num_threads(), helpers).

On this project's torch (2.14.1, OpenMP backend, 2 cores, OMP_NUM_THREADS=2) it printed

    A(set 1, then B set 2): (2, 0)   B(set 2): (2, 1)   fresh thread: (2, 1)   main: (2, 1)
    A(set 2, then B set 1): (1, 1)   B(set 1): (1, 0)   fresh thread: (1, 1)   main: (2, 1)

so the team size is the calling thread's own (A keeps its count after B sets another), a new
thread starts from the process default, and ``torch.get_num_threads()`` reports the last value
any thread set, not the caller's team. mugstan_chat.engine.threads applies a request's count in
each thread that does its work.

    OMP_NUM_THREADS=2 mugstan-chat bench threads
"""

from __future__ import annotations

import os
import threading

import torch

X = torch.randn(1500, 1500)  # one product keeps 2 cores busy for ~0.1 s


def cpu_ticks() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


def busy(tag: str, results: dict) -> None:
    me, before = threading.get_native_id(), cpu_ticks()
    for _ in range(15):
        X @ X
    after = cpu_ticks()
    helpers = [t for t in after if t != me and after[t] - before.get(t, 0) > 2]
    results[tag] = (torch.get_num_threads(), len(helpers))


def trial(first: int, second: int) -> dict:
    results: dict = {}
    a_set, b_set, a_done = threading.Event(), threading.Event(), threading.Event()

    def thread_a():
        torch.set_num_threads(first)
        a_set.set()
        b_set.wait()
        busy(f"A(set {first}, then B set {second})", results)
        a_done.set()

    def thread_b():
        a_set.wait()
        torch.set_num_threads(second)
        b_set.set()
        a_done.wait()
        busy(f"B(set {second})", results)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = threading.Thread(target=busy, args=("fresh thread", results))
    fresh.start()
    fresh.join()
    busy("main", results)
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(trial(1, 2))
    print(trial(2, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

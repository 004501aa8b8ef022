"""Load check of the web app: N concurrent clients upload a video and ask two questions, R rounds each.

Usage::

    mugstan-chat bench app-load --clients 8 --rounds 5            # starts `app.py --demo` itself
    mugstan-chat bench app-load --url http://127.0.0.1:7860 --clients 4 --rounds 2

Only apps on this machine (loopback addresses) are accepted. Each round is a new
gradio_client session (a new "user"): upload + encode, a question, a follow-up.
Reports requests, errors, p50/p95 of time to first token and total per question,
and the server's resident memory (RSS) before, at peak and after (psutil).
Figures for the repository are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose app.py it starts (a program, never imported)
MAX_CLIENTS = 64
MAX_ROUNDS = 100
QUESTIONS = ("what happens in the video?", "and what happens after that?")


@dataclass
class Results:
    """What the clients measured; lists are appended to from client threads (list.append is atomic)."""

    requests: int = 0
    errors: list[str] = field(default_factory=list)
    load_ms: list[float] = field(default_factory=list)  # upload + decode + encode
    first_token_ms: list[float] = field(default_factory=list)  # question sent -> first answer text seen
    total_ms: list[float] = field(default_factory=list)  # question sent -> final answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> None:
        with self.lock:
            self.requests += 1


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"mugstan-chat bench app-load: app.py exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise SystemExit(f"mugstan-chat bench app-load: {url} did not answer within {timeout_s:.0f} s")


def _listener_pid(port: int) -> int | None:
    """The pid listening on a local port (for --url), or None if it cannot be seen."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


class RssMonitor(threading.Thread):
    """Samples a process's RSS every ``every_s`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int | None, every_s: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid) if pid else None
        self.every_s = every_s
        self.peak = 0
        self.done = threading.Event()

    def rss(self) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.memory_info().rss
        except Exception:  # noqa: BLE001 -- the server went away: no figure
            return None

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak = max(self.peak, self.rss() or 0)


def _answer_text(messages) -> str:
    """Text of the last assistant message in gradio_client's Chatbot output."""
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    content = messages[-1].get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _wait(job, timeout_s: float, on_output=None):
    """Polls a gradio_client job until it is done (bounded: never blocks longer than ``timeout_s``)."""
    deadline = time.perf_counter() + timeout_s
    while not job.done():
        if on_output is not None:
            outputs = job.outputs()
            if outputs:
                on_output(outputs[-1])
        if time.perf_counter() > deadline:
            job.cancel()
            raise TimeoutError(f"no result within {timeout_s:.0f} s")
        time.sleep(0.01)
    return job.result(timeout=max(1.0, deadline - time.perf_counter()))


def _ask(client, question: str, max_new_tokens: int, timeout_s: float, results: Results) -> None:
    started = time.perf_counter()
    first: list[float] = []

    def seen(output) -> None:  # streamed outputs: (chatbot messages, question box)
        if not first and _answer_text(output[0]).strip():
            first.append(time.perf_counter())

    job = client.submit(question, max_new_tokens, 0.0, 1.0, api_name="/ask")
    messages, _ = _wait(job, timeout_s, seen)
    finished = time.perf_counter()
    text = _answer_text(messages)
    if "visual tokens" not in text:  # every successful answer ends with its stats line
        raise RuntimeError(f"bad answer: {text[:200]!r}")
    results.first_token_ms.append(((first[0] if first else finished) - started) * 1000)
    results.total_ms.append((finished - started) * 1000)


def _client(url: str, videos: list[Path], index: int, rounds: int, args, deadline: float, results: Results) -> None:
    from gradio_client import Client, handle_file

    for round_ in range(rounds):
        if time.monotonic() > deadline:
            results.errors.append(f"client {index}: stopped at round {round_}: time limit")
            return
        video = videos[(index + round_) % len(videos)]
        try:
            client = Client(url, verbose=False)  # a new session: a new user
            results.count()
            started = time.perf_counter()
            job = client.submit(handle_file(str(video)), args.frames, 1, args.temporal, api_name="/load_video")
            _, status = _wait(job, args.request_timeout)
            results.load_ms.append((time.perf_counter() - started) * 1000)
            if "visual tokens" not in status:
                raise RuntimeError(f"video not loaded: {status!r}")
            for question in QUESTIONS:
                results.count()
                _ask(client, question, args.max_new_tokens, args.request_timeout, results)
            client.close()
        except Exception as error:  # noqa: BLE001 -- counted and reported, the run goes on
            results.errors.append(f"client {index} round {round_}: {type(error).__name__}: {error}")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _fmt_mb(value: int | None) -> str:
    return "n/a" if not value else f"{value / 2**20:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench app-load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running app on 127.0.0.1 (default: start app.py --demo)")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--rounds", type=int, default=5, help=f"rounds per client (at most {MAX_ROUNDS})")
    parser.add_argument("--time-limit", type=float, default=600.0, help="whole run, seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="one question, seconds")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--temporal", default="stan", choices=["stan", "mean"])
    parser.add_argument("--app-args", default="", help="extra arguments for the app.py it starts")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --rounds 1..{MAX_ROUNDS}")

    process = None
    if args.url:
        parsed = urllib.parse.urlparse(args.url)
        if parsed.scheme not in ("http", "https") or not _is_loopback(parsed.hostname):
            parser.error("--url must point at this machine (127.0.0.1, ::1 or localhost)")
        url = args.url.rstrip("/")
        _wait_until_up(url + "/", None, 10)
        server_pid = _listener_pid(parsed.port or 80)
    else:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, str(ROOT / "app.py"), "--demo", "--host", "127.0.0.1", "--port", str(port),
                   "--queue-size", str(max(16, 2 * args.clients)), *args.app_args.split()]
        print("starting:", " ".join(command[1:]), file=sys.stderr)
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, start_new_session=True)
        server_pid = process.pid
    try:
        if process is not None:
            _wait_until_up(url + "/", process, 120)
        monitor = RssMonitor(server_pid)
        rss_before = monitor.rss()
        monitor.start()
        from mugstan_chat.synthetic import make_synthetic_videos

        results = Results()
        with tempfile.TemporaryDirectory() as tmp:
            videos = [path for path, _ in make_synthetic_videos(tmp, 8, seed=11)]
            deadline = time.monotonic() + args.time_limit
            started = time.perf_counter()
            threads = [threading.Thread(target=_client, args=(url, videos, i, args.rounds, args, deadline, results),
                                       name=f"client {i}", daemon=True)
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(1.0, deadline - time.monotonic() + args.request_timeout))
            stuck = [thread.name for thread in threads if thread.is_alive()]
            results.errors += [f"{name}: did not finish" for name in stuck]
            wall = time.perf_counter() - started
        monitor.done.set()
        time.sleep(1.0)  # let the server finish its bookkeeping
        rss_after = monitor.rss()
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the app.py this script started, and nothing else
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    figures = {
        "clients": args.clients, "rounds": args.rounds, "requests": results.requests,
        "questions": len(results.total_ms), "errors": len(results.errors), "wall_s": round(wall, 1),
        "load_video_ms": {"p50": _pct(results.load_ms, 50), "p95": _pct(results.load_ms, 95)},
        "first_token_ms": {"p50": _pct(results.first_token_ms, 50), "p95": _pct(results.first_token_ms, 95)},
        "total_ms": {"p50": _pct(results.total_ms, 50), "p95": _pct(results.total_ms, 95)},
        "rss_mb": {k: None if not v else round(v / 2**20, 1)
                   for k, v in (("before", rss_before), ("peak", monitor.peak), ("after", rss_after))},
    }
    print(f"| clients x rounds | requests | errors | wall s | load video p50/p95 ms | first token p50/p95 ms "
          f"| total p50/p95 ms | server RSS MB before / peak / after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.clients} x {args.rounds} | {results.requests} | {len(results.errors)} | {wall:.1f} "
          f"| {_fmt_ms(_pct(results.load_ms, 50))} / {_fmt_ms(_pct(results.load_ms, 95))} "
          f"| {_fmt_ms(_pct(results.first_token_ms, 50))} / {_fmt_ms(_pct(results.first_token_ms, 95))} "
          f"| {_fmt_ms(_pct(results.total_ms, 50))} / {_fmt_ms(_pct(results.total_ms, 95))} "
          f"| {_fmt_mb(rss_before)} / {_fmt_mb(monitor.peak)} / {_fmt_mb(rss_after)} |")
    for error in results.errors[:10]:
        print("error:", error, file=sys.stderr)
    if args.json:
        print(json.dumps(figures))
    return 1 if results.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

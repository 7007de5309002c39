"""What the benchmarks that drive `ally serve` share: the machine's load, the commit
measured, and the server itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet(threshold: float, max_wait: float, every: float = 10.0) -> float:
    """Wait until the 1-minute load average is below `threshold`; return the seconds waited.

    The machine is shared: a round measured next to another job's training says more about
    that job than about the service. Gives up after `max_wait` and measures anyway.
    """
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - started < max_wait:
        print(f"load average {load_average()}: waiting for < {threshold}", flush=True)
        time.sleep(every)
    return time.monotonic() - started


def code_version(*benchmark: str) -> str:
    """The commit measured, marked when the service or worker code (other than the
    benchmark's own files) differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "service", "worker", *(f":!{f}" for f in benchmark))
    return f"{commit} (with uncommitted changes)" if dirty else commit


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """`ally serve` on its own data folder, with an admin key; stopped on leaving the block.

    `env` adds settings (e.g. ALLY_DATABASE_URL) to the data folder; `serve_args` go to
    `ally serve` (e.g. `--workers 2`).
    """

    def __init__(
        self,
        data_dir: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ALLY_")}
        self.env["ALLY_DATA_DIR"] = str(data_dir)
        self.env.update(env or {})
        self.ally = [sys.executable, "-m", "worker.cli"]
        self.serve_args = list(serve_args)
        self.log_path = log
        self.server: subprocess.Popen[bytes] | None = None

    def run(self, *args: str) -> str:
        """An `ally` command against this service's data folder; its standard output."""
        done = subprocess.run(
            [*self.ally, *args], env=self.env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def __enter__(self) -> Service:
        key = self.run("keys", "create", "--role", "admin", "--name", "bench-admin")
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = self.log_path.open("w")
        self.server = subprocess.Popen(
            [*self.ally, "serve", "--port", str(port), *self.serve_args],
            env=self.env,
            stdout=self.log,
            stderr=self.log,
        )
        try:
            self.api = httpx.Client(
                base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
            )
            deadline = time.monotonic() + 60
            while True:
                if self.server.poll() is not None:
                    raise RuntimeError(f"ally serve exited with {self.server.returncode}")
                try:
                    if self.api.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("ally serve did not become ready within 60 s")
                time.sleep(0.2)
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            if self.server is not None and self.server.poll() is None:
                self.server.terminate()  # graceful: the embedded runner stops its children
                try:
                    self.server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.server.kill()
                    self.server.wait()
        finally:
            self.log.close()
        if error is not None:  # the server's side of the story
            tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(["--- ally serve log (tail) ---", *tail]), file=sys.stderr)

    def call(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self.api.request(method, url, **kwargs)
        if response.is_error:
            raise RuntimeError(f"{method} {url}: {response.status_code} {response.text[:500]}")
        return response.json()

"""The annotators' routes under load, each next to /healthz of the same server in the same run.

    .venv/bin/python -m worker.bench_load [--seconds 9] [--connections 32] [--workers 2]
        [--label "what this run measures"]

Creates a PostgreSQL database of its own (`ally_bench_load`, dropped at the end), starts
`ally serve --workers 2` on it (no broker: these routes need none), and seeds it as an
operator would: a pool of the 1,797 packaged digits imported through the API, annotator keys
made through the API, and a ready round of 200 queries written as a worker publishes them.
Then wrk hits the server on loopback at 32 connections, `--seconds` per phase, alternating
/healthz with each measured route: healthz, GET /queries/{round}, healthz, POST /labels,
healthz (after a short unreported warm-up of each). POST /labels sends one label per request
from 8 annotators over every (item, annotator) pair, each answer differing from the pair's
last (worker/load.lua), so every 2xx inserts a row; the run checks the labels table against
wrk's count. A route's ratio is its requests/s over the mean of the two /healthz phases
around it: the machine is shared and noisy, the ratio much less so.

Writes docs/benchmarks/load.json and load.md; a run given `--label` is also kept in the
json's history, which load.md shows as the before/after table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, make_url, text
from sqlmodel import Session, col, select

from service.db import make_engine
from service.models import Item, Label, Query, Round, RoundStatus, Split
from worker.bench_common import Service, code_version, load_average, wait_for_quiet

LUA_SCRIPT = Path(__file__).with_name("load.lua")
DIGITS = [str(d) for d in range(10)]
# The measured phases, in order; every route sits between two /healthz phases.
PLAN = ("healthz", "queries", "healthz", "labels", "healthz")
ROUTES = {
    "healthz": "GET /healthz",
    "queries": "GET /queries/{round}",
    "labels": "POST /labels",
}
WRK_INSTALL = "apt-get install -y wrk"


@dataclass
class Setup:
    """What the load test runs against: the server, its database and the seeded round."""

    service: Service
    database_url: str
    round_id: int
    item_ids: list[int]
    keys: dict[str, list[str]] = field(default_factory=dict)  # annotator keys by group

    def annotator_keys(self, group: str, count: int) -> list[str]:
        """`count` annotator keys named after `group`, made through the API once."""
        if group not in self.keys:
            self.keys[group] = [
                self.service.call(
                    "POST", "/keys", json={"name": f"{group}-{i}", "role": "annotator"}
                )["key"]
                for i in range(count)
            ]
        return self.keys[group]

    def disable_label_notifications(self) -> None:
        engine = make_engine(self.database_url)
        try:
            with engine.begin() as connection:
                connection.execute(text("ALTER TABLE labels DISABLE TRIGGER labels_notify_rounds"))
        finally:
            engine.dispose()

    def labels_in_database(self) -> int:
        engine = make_engine(self.database_url)
        try:
            with Session(engine) as session:
                return session.exec(select(func.count()).select_from(Label)).one()
        finally:
            engine.dispose()


@contextlib.contextmanager
def own_database(server_url: str, name: str) -> Iterator[str]:
    """A fresh PostgreSQL database `name` on the server of `server_url`, dropped afterwards."""
    admin = make_engine(server_url)
    drop = text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(drop)  # left over from an interrupted run
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(False)
        finally:
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(drop)
    finally:
        admin.dispose()


def publish_round(
    database_url: str, pool_id: int, queries: int, seed: int
) -> tuple[int, list[int]]:
    """A ready round of `queries` random pool items, written as worker.pipeline.publish does."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            items = session.exec(
                select(Item.id)
                .where(Item.pool_id == pool_id, Item.split == Split.pool)
                .order_by(col(Item.id))
            ).all()
            picked = random.Random(seed).sample(list(items), queries)
            round_ = Round(
                pool_id=pool_id,
                number=1,
                strategy="random",
                budget=queries,
                seed=seed,
                status=RoundStatus.ready,
                phase="done",
                progress=1.0,
            )
            session.add(round_)
            session.flush()
            session.add_all(
                Query(
                    round_id=round_.id,  # type: ignore[arg-type]
                    item_id=item_id,
                    rank=rank,
                    score=1.0 - rank / queries,
                    cluster=rank % 10,
                )
                for rank, item_id in enumerate(picked)
            )
            session.commit()
            return round_.id, picked  # type: ignore[return-value]
    finally:
        engine.dispose()


@contextlib.contextmanager
def load_setup(
    server_url: str, database: str, *, workers: int, queries: int, tmp: Path
) -> Iterator[Setup]:
    """`ally serve --workers N` on a fresh database, seeded with a pool and a ready round."""
    with own_database(server_url, database) as database_url:
        service = Service(
            tmp / "data",
            tmp / "server.log",
            env={"ALLY_DATABASE_URL": database_url},
            serve_args=("--workers", str(workers)),
        )
        with service:
            pool = service.call(
                "POST",
                "/pools",
                json={
                    "name": "load",
                    "task": "classification",
                    "classes": DIGITS,
                    "input_kind": "image",
                },
            )
            service.call("POST", f"/pools/{pool['id']}/import", json={"dataset": "digits"})
            round_id, item_ids = publish_round(database_url, pool["id"], queries, seed=0)
            yield Setup(service, database_url, round_id, item_ids)


@dataclass
class Process:
    parent: int
    cpu_seconds: float  # user + system
    title: str  # the command line, as `ps` shows it


def processes() -> dict[int, Process]:
    """Every process of the machine, from Linux /proc."""
    found = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            title = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        found[int(stat.parent.name)] = Process(int(fields[1]), cpu, title)
    return found


def cpu_seconds(server: int, database: str) -> tuple[float, float]:
    """CPU seconds used so far by the `ally serve` process tree, and by the PostgreSQL
    backends connected to `database` (those still running: a closed connection's are lost)."""
    running = processes()
    tree, grew = {server}, True
    while grew:
        more = {pid for pid, p in running.items() if p.parent in tree} - tree
        tree |= more
        grew = bool(more)
    api = sum(running[pid].cpu_seconds for pid in tree if pid in running)
    backend = f": postgres {database} "  # "postgres: 15/main: postgres DATABASE HOST STATE"
    db = sum(
        p.cpu_seconds
        for p in running.values()
        if p.title.startswith("postgres: ") and backend in p.title
    )
    return api, db


def wait_until_idle(server: int, most: float = 0.05, timeout: float = 60) -> float:
    """Wait until `ally serve` uses under `most` of a CPU (its embedded round runner imports
    torch as it starts); the seconds waited."""
    started = time.monotonic()
    used = cpu_seconds(server, "")[0]
    while time.monotonic() - started < timeout:
        time.sleep(1.0)
        previous, used = used, cpu_seconds(server, "")[0]
        if used - previous < most:
            break
    return time.monotonic() - started


def require_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError(f"wrk is not installed; install it with: {WRK_INSTALL}")
    return found


def wrk(
    setup: Setup,
    route: str,
    seconds: int,
    *,
    connections: int,
    threads: int,
    keys: list[str],
    timeout: int = 2,
) -> dict[str, Any]:
    """One wrk phase on `route` (healthz, queries or labels): its report, with requests/s.
    A request unanswered after `timeout` seconds counts as an error."""
    command = [
        require_wrk(),
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={timeout}s",
        f"--script={LUA_SCRIPT}",
        setup.service.base_url,
        "--",
        route,
        str(setup.round_id),
        str(threads),
        ",".join(keys),
        ",".join(str(i) for i in setup.item_ids),
        ",".join(DIGITS),
    ]
    server = setup.service.server
    assert server is not None
    database = make_url(setup.database_url).database or ""
    api_before, db_before = cpu_seconds(server.pid, database)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    api_after, db_after = cpu_seconds(server.pid, database)
    reports = [line for line in done.stdout.splitlines() if line.startswith("wrk-report ")]
    if done.returncode != 0 or len(reports) != 1:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    report = json.loads(reports[0].removeprefix("wrk-report "))
    report["route"] = route
    report["requests_per_s"] = report["requests"] / (report["duration_us"] / 1e6)
    # Less noisy than requests/s on a shared machine: what one request costs.
    report["api_cpu_ms_per_request"] = 1000 * (api_after - api_before) / report["requests"]
    # Not below 0: a backend that exits during the phase takes its CPU time with it.
    db_cpu = max(0.0, db_after - db_before)
    report["db_cpu_ms_per_request"] = 1000 * db_cpu / report["requests"]
    status = report["status"]
    errors = report["errors"]
    # Socket errors and timeouts, and every response that is not a 2xx.
    report["failed"] = (
        errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    ) + (report["requests"] - status["2xx"])
    return report


def run_plan(
    setup: Setup,
    *,
    seconds: int,
    connections: int,
    threads: int,
    warmup: int,
    annotators: int = 8,
    timeout: int = 2,
) -> dict[str, Any]:
    """The warm-up, then PLAN's phases; each route's ratio to the /healthz around it."""
    warmup_phases = []
    if warmup > 0:
        for route in ("healthz", "queries", "labels"):
            keys = setup.annotator_keys("warmup", annotators)
            warmup_phases.append(
                wrk(
                    setup,
                    route,
                    warmup,
                    connections=connections,
                    threads=threads,
                    keys=keys,
                    timeout=timeout,
                )
            )
    keys = setup.annotator_keys("annotator", annotators)
    phases = []
    for route in PLAN:
        print(f"{ROUTES[route]} for {seconds} s ... ", end="", flush=True)
        phase = wrk(
            setup,
            route,
            seconds,
            connections=connections,
            threads=threads,
            keys=keys,
            timeout=timeout,
        )
        phase["load_average"] = load_average()
        print(
            f"{phase['requests_per_s']:.0f} requests/s, "
            f"CPU per request: API {phase['api_cpu_ms_per_request']:.2f} ms, "
            f"PostgreSQL {phase['db_cpu_ms_per_request']:.2f} ms",
            flush=True,
        )
        phases.append(phase)
    summary = {}
    for index, phase in enumerate(phases):
        if phase["route"] == "healthz":
            continue
        around = [phases[index - 1]["requests_per_s"], phases[index + 1]["requests_per_s"]]
        healthz = sum(around) / 2
        summary[phase["route"]] = {
            **_figures([phase]),
            "healthz_requests_per_s": healthz,
            "ratio": phase["requests_per_s"] / healthz,
        }
    summary["healthz"] = _figures([p for p in phases if p["route"] == "healthz"])
    return {"warmup": warmup_phases, "phases": phases, "summary": summary}


def _figures(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of one route's phases: means, the worst percentiles, all failures."""

    def mean(key: str) -> float:
        return sum(p[key] for p in phases) / len(phases)

    return {
        "requests_per_s": mean("requests_per_s"),
        "p50_ms": max(p["latency_us"]["p50"] for p in phases) / 1000,
        "p99_ms": max(p["latency_us"]["p99"] for p in phases) / 1000,
        "failed": sum(p["failed"] for p in phases),
        "api_cpu_ms": mean("api_cpu_ms_per_request"),
        "db_cpu_ms": mean("db_cpu_ms_per_request"),
    }


# --- the report -------------------------------------------------------------------------

AIMS = {"queries": 0.9, "labels": 0.7}


def summary_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| route | requests/s | /healthz requests/s | ratio (aim) | p50 ms | p99 ms | failed "
        "| CPU ms per request: API + PostgreSQL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for route in ("queries", "labels"):
        s = summary[route]
        lines.append(
            f"| `{ROUTES[route]}` | {s['requests_per_s']:.0f} | {s['healthz_requests_per_s']:.0f} "
            f"| **{s['ratio']:.2f}** (≥ {AIMS[route]}) | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
            f"| {s['failed']} | {s['api_cpu_ms']:.2f} + {s['db_cpu_ms']:.2f} |"
        )
    h = summary["healthz"]
    lines.append(
        f"| `{ROUTES['healthz']}` (3 phases) | {h['requests_per_s']:.0f} | | 1 | "
        f"≤ {h['p50_ms']:.1f} | ≤ {h['p99_ms']:.1f} | {h['failed']} | "
        f"{h['api_cpu_ms']:.2f} + {h['db_cpu_ms']:.2f} |"
    )
    return lines


def phase_table(phases: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| phase | route | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | "
        "non-2xx | socket errors | CPU ms per request: API + PostgreSQL | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, p in enumerate(phases, 1):
        latency, errors = p["latency_us"], p["errors"]
        socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
        lines.append(
            f"| {number} | `{ROUTES[p['route']]}` | {p['requests']:,} | "
            f"{p['requests_per_s']:.0f} | {latency['p50'] / 1000:.1f} | "
            f"{latency['p90'] / 1000:.1f} | {latency['p99'] / 1000:.1f} | "
            f"{latency['max'] / 1000:.1f} | {p['requests'] - p['status']['2xx']} | "
            f"{socket_errors} | {p['api_cpu_ms_per_request']:.2f} + "
            f"{p['db_cpu_ms_per_request']:.2f} | {p['load_average'][0]} |"
        )
    return lines


def history_table(history: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | commit | GET /queries req/s (× /healthz) | p99 ms | CPU ms | "
        "POST /labels req/s (× /healthz) | p99 ms | CPU ms | /healthz req/s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in history:
        s = run["summary"]
        q, lab, h = s["queries"], s["labels"], s["healthz"]
        lines.append(
            f"| {run['label']} | {run['commit']} | {q['requests_per_s']:.0f} "
            f"(**×{q['ratio']:.2f}**) | {q['p99_ms']:.0f} | "
            f"{q['api_cpu_ms']:.2f} + {q['db_cpu_ms']:.2f} | {lab['requests_per_s']:.0f} "
            f"(**×{lab['ratio']:.2f}**) | {lab['p99_ms']:.0f} | "
            f"{lab['api_cpu_ms']:.2f} + {lab['db_cpu_ms']:.2f} | {h['requests_per_s']:.0f} | "
            f"{q['failed'] + lab['failed'] + h['failed']} |"
        )
    return lines


def write_report(report: dict[str, Any], history: list[dict[str, Any]], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(
        json.dumps({"latest": report, "history": history}, indent=1) + "\n"
    )
    s, m, load = report["settings"], report["machine"], report["load_average"]
    lines = [
        "# The annotators' routes under load, against /healthz",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        f"{report['what']}. Measured {report['measured']} at commit {report['commit']} on "
        f"{m['processor']}, {m['cpus']} CPUs shared by wrk, the API processes and PostgreSQL "
        f"({m['wrk']}, Python {m['python']}). Load average (1, 5, 15 min) {load['start']} at "
        f"the start (after waiting {load['waited_s']:.0f} s for the 1-minute figure to drop "
        f"below {load['threshold']}) and {load['end']} at the end.",
        "",
        f"wrk: {s['threads']} threads, {s['connections']} connections, {s['seconds']} s per "
        f"phase after a {s['warmup']} s warm-up of each route; phases in the order "
        + ", ".join(ROUTES[r] for r in PLAN)
        + ". **Ratio**: the route's requests/s over the mean of the /healthz phases just "
        "before and after it. **Failed**: socket errors, timeouts (2 s) and every response "
        "that is not a 2xx. **CPU ms per request**: the CPU time the `ally serve` processes "
        "and this database's PostgreSQL backends used during the phase, over its requests "
        "(a backend that exits during the phase takes its share along: an undercount when "
        "the API closes connections); unlike requests/s it hardly depends on what else the "
        "machine runs. "
        f"POST /labels stored {report['labels_in_database']:,} labels over the run "
        f"(warm-up included): each of the {report['labels_acknowledged']:,} that wrk saw "
        f"answered with a 2xx, and the rest of the {report['labels_sent']:,} it sent were in "
        "flight when it stopped.",
        "",
        *summary_table(report["summary"]),
        "",
        "Every phase of this run:",
        "",
        *phase_table(report["phases"]),
        "",
        "## Before and after",
        "",
        "Each change measured the same way, one run each (`--label`), at different times: "
        "compare the ratios and the CPU per request (API + PostgreSQL) across runs, not the "
        "requests/s.",
        "",
        *history_table(history),
    ]
    text_ = "\n".join(lines) + "\n"
    (out / "load.md").write_text(text_)
    return text_


def wrk_version() -> str:
    done = subprocess.run([require_wrk(), "--version"], capture_output=True, text=True)
    return (done.stdout or done.stderr).split(" Copyright")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--database", default="ally_bench_load")
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    parser.add_argument("--queries", type=int, default=200, help="queries of the round")
    parser.add_argument("--seconds", type=int, default=9, help="per phase")
    parser.add_argument("--warmup", type=int, default=1, help="seconds per route, unreported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--label", help="keep this run in the history under this name")
    parser.add_argument(
        "--without-label-notifications",
        action="store_true",
        help="disable the trigger that tells API processes which rounds new labels changed, "
        "to measure what it costs POST /labels (kept GET /queries pages then go stale)",
    )
    parser.add_argument("--quiet-load", type=float, default=1.0, help="start below this load")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for it")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    if args.seconds * len(PLAN) + args.warmup * 3 > 60:
        raise SystemExit("the whole load test must take at most 60 s of wrk")
    # A plain SIGTERM would skip the finally blocks: the server and the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    require_wrk()

    waited = wait_for_quiet(args.quiet_load, args.max_wait)
    load_at_start = load_average()
    commit = code_version("worker/bench_load.py", "worker/load.lua")
    measured = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with (
        tempfile.TemporaryDirectory(prefix="ally-bench-load-") as tmp,
        load_setup(
            args.server, args.database, workers=args.workers, queries=args.queries, tmp=Path(tmp)
        ) as setup,
    ):
        assert setup.service.server is not None
        if args.without_label_notifications:
            setup.disable_label_notifications()
        idle_after = wait_until_idle(setup.service.server.pid)
        result = run_plan(
            setup,
            seconds=args.seconds,
            connections=args.connections,
            threads=args.threads,
            warmup=args.warmup,
        )
        in_database = setup.labels_in_database()
    labels = [p for p in result["warmup"] + result["phases"] if p["route"] == "labels"]
    acknowledged = sum(p["status"]["2xx"] for p in labels)
    sent = sum(p["sent"] for p in labels)
    # wrk stops with requests in flight: the server stores them, wrk never counts them.
    if not acknowledged <= in_database <= sent:
        raise SystemExit(f"{acknowledged} labels acknowledged, {sent} sent, {in_database} stored")

    command = ".venv/bin/python -m worker.bench_load " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    report = {
        "command": command.strip(),
        "what": f"`ally serve --workers {args.workers}` (uvicorn, no broker) on PostgreSQL, "
        f"a pool of 1,797 digit images, a ready round of {args.queries} queries; "
        "GET /queries/{round} returns the first page (50 queries, with the count), "
        "POST /labels one label each from 8 annotator keys"
        + (
            "; the label notifications' trigger disabled"
            if args.without_label_notifications
            else ""
        ),
        "measured": measured,
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk": wrk_version(),
        },
        "load_average": {
            "threshold": args.quiet_load,
            "waited_s": waited,
            "server_idle_after_s": idle_after,
            "start": load_at_start,
            "end": load_average(),
        },
        "settings": {
            "workers": args.workers,
            "queries": args.queries,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "label_notifications": not args.without_label_notifications,
        },
        **result,
        "labels_in_database": in_database,
        "labels_acknowledged": acknowledged,
        "labels_sent": sent,
    }
    previous = args.out / "load.json"
    history = json.loads(previous.read_text())["history"] if previous.exists() else []
    if args.label:
        history = [run for run in history if run["label"] != args.label]
        history.append(
            {
                "label": args.label,
                "measured": measured,
                "commit": commit,
                "summary": result["summary"],
            }
        )
    print(write_report(report, history, args.out))


if __name__ == "__main__":
    main()

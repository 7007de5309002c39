"""Issue 7's reference: a bare FastAPI + SQLModel app under the load test's wrk, each route
next to its own /healthz in the same run (docs/benchmarks/load-bare.md).

    .venv/bin/python -m worker.bench_load_bare [--seconds 9] [--connections 32]

The app is what the FastAPI + SQLModel tutorial would have one write: sync routes, a session
per request, a model per row. GET /queries/{round} returns a round's first 50 queries, POST
/labels inserts one label, /healthz returns a dict; no keys, no checks. Two uvicorn workers
(their defaults: access log on) on a PostgreSQL database of its own, wrk on loopback, phases
in worker/bench_load.py's order.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI
from sqlalchemy.orm import registry
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from worker.bench_common import code_version, free_port, load_average
from worker.bench_load import PLAN, ROUTES, own_database, require_wrk

DATABASE_URL = "ALLY_BENCH_BARE_DATABASE_URL"


class BareModel(SQLModel, registry=registry()):
    """Tables of their own metadata, apart from the service's."""


class BareQuery(BareModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(index=True)
    item_id: int
    rank: int
    score: float
    cluster: int


class BareLabelIn(SQLModel):
    item_id: int
    value: str
    round_id: int


class BareLabel(BareModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    item_id: int
    value: str
    round_id: int
    created_at: datetime


@functools.cache
def _engine():  # type: ignore[no-untyped-def]
    return create_engine(os.environ[DATABASE_URL], pool_size=10)


def _session() -> Iterator[Session]:
    with Session(_engine()) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
app = FastAPI()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/queries/{round_id}")
def read_queries(
    round_id: int, session: SessionDep, offset: int = 0, limit: int = 50
) -> list[BareQuery]:
    return list(
        session.exec(
            select(BareQuery)
            .where(BareQuery.round_id == round_id)
            .order_by(col(BareQuery.rank))
            .offset(offset)
            .limit(limit)
        )
    )


@app.post("/labels")
def create_label(body: BareLabelIn, session: SessionDep) -> BareLabel:
    label = BareLabel(**body.model_dump(), created_at=datetime.now(UTC))
    session.add(label)
    session.commit()
    session.refresh(label)
    return label


# --- the benchmark ----------------------------------------------------------------------

POST_LABEL = """wrk.method = "POST"
wrk.body = '{"item_id": 7, "value": "3", "round_id": 1}'
wrk.headers["Content-Type"] = "application/json"
"""


def seed(database_url: str, queries: int = 200) -> None:
    engine = create_engine(database_url)
    BareModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            BareQuery(round_id=1, item_id=i, rank=i, score=1 - i / queries, cluster=i % 10)
            for i in range(queries)
        )
        session.commit()
    engine.dispose()


def wrk(url: str, route: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    path = {"healthz": "/healthz", "queries": "/queries/1", "labels": "/labels"}[route]
    command = [require_wrk(), "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if route == "labels":
        command += ["-s", str(script)]
    out = subprocess.run([*command, url + path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if found is None or p99 is None:
        raise RuntimeError(f"wrk printed no figures: {out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {
        "requests_per_s": float(found.group(1)),
        "p99_ms": float(p99.group(1)) * scale,
        "failed": (int(failed.group(1)) if failed else 0)
        + (sum(int(n) for n in errors.groups()) if errors else 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=int, default=9, help="per phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    require_wrk()
    phases = []
    with (
        own_database(args.server, "ally_bench_bare") as database_url,
        tempfile.TemporaryDirectory(prefix="ally-bench-bare-") as tmp,
    ):
        seed(database_url)
        script = Path(tmp) / "post.lua"
        script.write_text(POST_LABEL)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        uvicorn = [sys.executable, "-m", "uvicorn", "worker.bench_load_bare:app"]
        server = subprocess.Popen(
            [*uvicorn, "--workers", "2", "--port", str(port)],
            env={**os.environ, DATABASE_URL: database_url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            for route in ("healthz", "queries", "labels"):  # warm-up, unreported
                wrk(url, route, 1, args.connections, script)
            for route in PLAN:
                phase = {"route": route, **wrk(url, route, args.seconds, args.connections, script)}
                print(f"{ROUTES[route]}: {phase['requests_per_s']:.0f} requests/s", flush=True)
                phases.append(phase)
        finally:
            server.terminate()
            server.wait(timeout=30)
    ratios = {
        phase["route"]: phase["requests_per_s"]
        / ((phases[i - 1]["requests_per_s"] + phases[i + 1]["requests_per_s"]) / 2)
        for i, phase in enumerate(phases)
        if phase["route"] != "healthz"
    }
    report = {
        "command": ".venv/bin/python -m worker.bench_load_bare " + " ".join(sys.argv[1:]),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": code_version("worker/bench_load_bare.py"),
        "load_average_end": load_average(),
        "connections": args.connections,
        "seconds": args.seconds,
        "phases": phases,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load-bare.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# A bare FastAPI + SQLModel app under the same load, against its own /healthz",
        "",
        f"```sh\n{report['command'].strip()}\n```",
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip().replace("\n", " ")
        + f" Measured {report['measured']} at commit {report['commit']}, {args.connections} "
        f"connections, {args.seconds} s per phase after a 1 s warm-up of each route; load "
        f"average {report['load_average_end']} at the end.",
        "",
        "| phase | route | requests/s | p99 ms | failed |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | `{ROUTES[p['route']]}` | {p['requests_per_s']:.0f} | {p['p99_ms']:.1f} "
            f"| {p['failed']} |"
            for n, p in enumerate(phases, 1)
        ),
        "",
        f"Ratios to the /healthz phases around each route: GET /queries/{{round}} "
        f"**×{ratios['queries']:.2f}**, POST /labels **×{ratios['labels']:.2f}** (the service's "
        "own: [load.md](load.md)).",
    ]
    (args.out / "load-bare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

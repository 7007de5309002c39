"""Round latency through the service against the engine alone, on MNIST pools of two sizes.

    .venv/bin/python -m worker.bench_service [--data ../shared/data/mnist] [--sizes 10000,60000]

For each pool size it runs the whole service as an operator would (`ally serve` on a fresh data
folder: SQLite, the embedded round runner, no broker), imports the first N MNIST training
images with `ally import` (the test split becomes the holdout), posts `--labeled` random seed
labels and times two ALLY rounds from `POST /rounds` to `ready`. The first round decodes
every blob of the pool; the second, started after the first one's queries were labeled
through `POST /labels`, reads the decoded-pool cache instead. Then the engine
alone (`worker.ally.loop.run_round`) runs on the same labeled set, pool and seed, with the
server stopped. Writes docs/benchmarks/service.json and service.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.blobs import blob_key
from service.datasets import ArrayDataset, read_mnist
from service.images import npy_bytes
from worker.ally.data import input_tensors
from worker.ally.loop import evaluate, run_round
from worker.ally.select import Ally
from worker.bench_common import Service, code_version, load_average, wait_for_quiet

SERVICE_PHASES = ("load", "train", "embed", "dual_head", "select")
ENGINE_PHASES = ("train", "embed", "dual_head", "select")
MODEL_SPEC = {"network": "mlp"}


# --- the machine ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# --- the data ---------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uint8 array as an uncompressed IDX file (big-endian header, as `read_idx` reads)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def mnist_folder(data: Path, splits: dict[str, ArrayDataset], size: int, tmp: Path) -> Path:
    """A folder of IDX files with the first `size` training images and the whole test split."""
    if size == len(splits["train"]):
        return data
    folder = tmp / f"mnist-{size}"
    folder.mkdir()
    train, test = splits["train"], splits["test"]
    write_idx(folder / "train-images-idx3-ubyte", train.x[:size])
    write_idx(folder / "train-labels-idx1-ubyte", train.y[:size])
    write_idx(folder / "t10k-images-idx3-ubyte", test.x)
    write_idx(folder / "t10k-labels-idx1-ubyte", test.y)
    return folder


# --- the service ------------------------------------------------------------------------


def check_item_order(
    service: Service, splits: dict[str, ArrayDataset], size: int, first_id: int
) -> None:
    """Fail unless item ids follow the import order: pool images first, then the holdout.

    The mapping item id -> source image is what lets the benchmark answer queries without
    fetching 60,000 images; a sample of hashes and pixels proves it.
    """
    rng = np.random.default_rng(1)
    holdout = len(splits["test"])
    sample = [("pool", i) for i in [0, size - 1, *rng.integers(0, size, 8).tolist()]]
    sample += [("holdout", j) for j in [0, holdout - 1, *rng.integers(0, holdout, 4).tolist()]]
    for split, index in sample:
        source = splits["train" if split == "pool" else "test"].x[index]
        item_id = first_id + index + (size if split == "holdout" else 0)
        item = service.call("GET", f"/items/{item_id}")
        if item["split"] != split or item["sha256"] != blob_key(npy_bytes(source)):
            raise RuntimeError(f"item {item_id} is not {split} image {index}: ids not in order")
    for _, index in sample[:2]:  # the first and the last pool image
        image = service.api.get(f"/items/{first_id + index}/image")
        pixels = np.asarray(Image.open(io.BytesIO(image.content)))
        if not np.array_equal(pixels, splits["train"].x[index]):
            raise RuntimeError(f"item {first_id + index}: its pixels differ from image {index}")


def timed_round(
    service: Service, pool_id: int, budget: int, seed: int, poll: float, timeout: float = 600
) -> dict:
    """POST /rounds, then GET /rounds/{id} every `poll` seconds until it is ready."""
    load_at_start = load_average()
    body = {"pool_id": pool_id, "strategy": "ally", "budget": budget, "seed": seed}
    started = time.perf_counter()
    round_ = service.call("POST", "/rounds", json=body)
    post = time.perf_counter() - started
    seen: dict[str, float] = {}  # when the client first saw each phase, from the POST
    while round_["status"] in ("queued", "running"):
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"round {round_['id']} not ready after {timeout:.0f} s")
        time.sleep(poll)
        round_ = service.call("GET", f"/rounds/{round_['id']}")
        seen.setdefault(round_["phase"] or round_["status"], time.perf_counter() - started)
    latency = time.perf_counter() - started
    if round_["status"] != "ready":
        raise RuntimeError(f"round {round_['id']} ended {round_['status']}: {round_['error']}")
    stamp = {k: datetime.fromisoformat(round_[k]) for k in ("created_at", "started_at")}
    stamp["finished_at"] = datetime.fromisoformat(round_["finished_at"])
    timings = {phase: round_["timings"].get(phase, 0.0) for phase in SERVICE_PHASES}
    phases = sum(round_["timings"].values())
    queue = (stamp["started_at"] - stamp["created_at"]).total_seconds()
    in_worker = (stamp["finished_at"] - stamp["started_at"]).total_seconds()
    queries = service.call("GET", f"/queries/{round_['id']}", params={"limit": 500})["data"]
    return {
        "round_id": round_["id"],
        "number": round_["number"],
        "labeled": round_["labeled_at_start"],
        "load_average_at_post": load_at_start,
        "latency_s": latency,
        "post_s": post,
        "phases": timings,
        "phases_s": phases,
        "overhead_s": latency - phases,
        # Created -> claimed: the runner's poll, and a cold runner's process start and imports.
        "queue_s": queue,
        # Claimed -> finished_at, outside the phases: holdout accuracy, checkpoint, heartbeats.
        "worker_other_s": in_worker - phases,
        # The rest: request handling before the row exists, the publish transaction after
        # finished_at is stamped, and the client's poll interval.
        "publish_and_poll_s": latency - queue - in_worker,
        "phase_first_seen_s": seen,
        "metrics": round_["metrics"],
        "query_ids": sorted(q["item_id"] for q in queries),
    }


@dataclass
class Pool:
    """A pool's service side, as the engine needs it to repeat its rounds."""

    first_id: int  # item id of pool image 0; pool image i is first_id + i
    import_s: float
    rounds: list[dict]
    labeled_at: list[np.ndarray]  # the labeled source indices each round started with


def serve_rounds(
    splits: dict[str, ArrayDataset], folder: Path, size: int, args: argparse.Namespace, tmp: Path
) -> Pool:
    """Import the pool into a fresh service, seed it, and time two rounds through the API."""
    train = splits["train"]
    classes = [str(d) for d in range(10)]
    with Service(tmp / f"data-{size}", tmp / f"server-{size}.log") as service:
        pool = service.call(
            "POST",
            "/pools",
            json={
                "name": f"bench-mnist-{size}",
                "task": "classification",
                "classes": classes,
                "input_kind": "image",
                "model_spec": MODEL_SPEC,
            },
        )
        started = time.perf_counter()
        print(service.run("import", "--pool", str(pool["id"]), str(folder)), flush=True)
        import_s = time.perf_counter() - started
        counts = service.call("GET", f"/pools/{pool['id']}")
        if (counts["items"], counts["holdout"]) != (size, len(splits["test"])):
            raise RuntimeError(f"imported {counts['items']} + {counts['holdout']} items")
        first_id = 1  # a fresh database numbers items from 1, in import order
        check_item_order(service, splits, size, first_id)

        rng = np.random.default_rng(args.seed)
        labeled = np.sort(rng.choice(size, args.labeled, replace=False))
        seeds = [{"item_id": first_id + int(i), "value": classes[train.y[i]]} for i in labeled]
        service.call("POST", "/labels", json=seeds)
        rounds, labeled_at = [], []
        for number in range(1, args.rounds + 1):
            labeled_at.append(labeled)
            round_ = timed_round(service, pool["id"], args.budget, args.seed, args.poll)
            if round_["labeled"] != len(labeled):
                raise RuntimeError(f"round {number} saw {round_['labeled']} labeled items")
            rounds.append(round_)
            print(
                f"pool {size} round {number}: {round_['latency_s']:.2f} s "
                f"(phases {round_['phases_s']:.2f} s)",
                flush=True,
            )
            if number < args.rounds:  # the annotator answers every query, as a person would
                picked = np.asarray(round_["query_ids"]) - first_id
                answers = [
                    {"item_id": first_id + int(i), "value": classes[train.y[i]]} for i in picked
                ]
                service.call("POST", "/labels", json=answers)
                labeled = np.union1d(labeled, picked)
    return Pool(first_id=first_id, import_s=import_s, rounds=rounds, labeled_at=labeled_at)


# --- the engine alone -------------------------------------------------------------------


def engine_round(
    splits: dict[str, ArrayDataset], size: int, labeled: np.ndarray, first_id: int, args: Any
) -> dict:
    """The same round with the learning library alone, inputs prepared as the worker does.

    Run `args.engine_repeats` times: on this shared machine one run of two-thread training
    can take several times another's, so the median run stands for the engine.
    """
    train, test = splits["train"], splits["test"]
    x = train.x[:size]
    is_labeled = np.zeros(size, dtype=bool)
    is_labeled[labeled] = True
    ids = first_id + np.arange(size)
    started = time.perf_counter()
    # As worker.pipeline.load_inputs: standardized with the whole pool split's statistics.
    labeled_x, pool_x, holdout_x = input_tensors("image", x, x[is_labeled], x[~is_labeled], test.x)
    prepare = time.perf_counter() - started
    runs = []
    for _ in range(args.engine_repeats):
        load_at_start = load_average()
        started = time.perf_counter()
        result = run_round(
            Ally(), "classification", labeled_x, torch.from_numpy(train.y[:size][is_labeled]),
            ids[is_labeled], pool_x, ids[~is_labeled], args.budget, args.seed,
            network=MODEL_SPEC["network"], num_outputs=10,
        )  # fmt: skip
        total = time.perf_counter() - started
        runs.append(
            {
                "phases": {phase: result.seconds.get(phase, 0.0) for phase in ENGINE_PHASES},
                "total_s": total,
                "epochs": len(result.trained.history),
                "query_ids": sorted(int(i) for i in result.query.ids),
                "load_average_at_start": load_at_start,
            }
        )
    # What the service's round computes besides the query: holdout accuracy, a checkpoint.
    started = time.perf_counter()
    measured = evaluate(result.trained.model, "classification", holdout_x, torch.from_numpy(test.y))
    torch.save({"model": result.trained.model.state_dict()}, io.BytesIO())
    extras = time.perf_counter() - started
    median = sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]
    return {
        **median,
        "runs_s": [run["total_s"] for run in runs],
        "runs": runs,
        "prepare_s": prepare,
        "holdout_and_checkpoint_s": extras,
        "accuracy": measured["accuracy"],
    }


# --- the report -------------------------------------------------------------------------


def table(sizes: list[dict]) -> list[str]:
    lines = [
        "| pool | round | labeled | service s | engine s (runs) | ratio | outside phases s | "
        "queue s | load s | worker other s | publish + poll s | same queries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes:
        for r in entry["rounds"]:
            s, e = r["service"], r["engine"]
            lines.append(
                f"| {entry['pool']:,} | {s['number']} | {s['labeled']:,} | "
                f"{s['latency_s']:.2f} | {e['total_s']:.2f} "
                f"({' / '.join(f'{t:.1f}' for t in e['runs_s'])}) | **{r['ratio']:.2f}** | "
                f"{s['overhead_s']:.2f} | {s['queue_s']:.2f} | {s['phases']['load']:.2f} | "
                f"{s['worker_other_s']:.2f} | {s['publish_and_poll_s']:.2f} | "
                f"{r['same_queries']}/{len(s['query_ids'])} |"
            )
    return lines


def phase_table(sizes: list[dict]) -> list[str]:
    lines = [
        "| pool | round | | load / prepare | train | embed | dual head | select | sum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes:
        for r in entry["rounds"]:
            s, e = r["service"], r["engine"]
            p = s["phases"]
            lines.append(
                f"| {entry['pool']:,} | {s['number']} | service | {p['load']:.2f} | "
                f"{p['train']:.2f} | {p['embed']:.2f} | {p['dual_head']:.2f} | "
                f"{p['select']:.2f} | {s['phases_s']:.2f} |"
            )
            q = e["phases"]
            lines.append(
                f"| | | engine | ({e['prepare_s']:.2f}) | {q['train']:.2f} | {q['embed']:.2f} | "
                f"{q['dual_head']:.2f} | {q['select']:.2f} | {e['total_s']:.2f} |"
            )
    return lines


def summary(sizes: list[dict]) -> list[str]:
    """The headline: a later (warm) round and the first (cold) round of each pool size."""
    warm = [(e["pool"], e["rounds"][-1]) for e in sizes]
    cold = [(e["pool"], e["rounds"][0]) for e in sizes]

    def each(pairs: list[tuple[int, dict]], say: Any) -> str:
        return "; ".join(f"{pool:,} items: {say(r)}" for pool, r in pairs)

    return [
        "**Steady state** (a later round of the same `ally serve`): "
        + each(
            warm,
            lambda r: (
                f"×{r['ratio']:.2f} ({r['service']['latency_s']:.1f} s against "
                f"{r['engine']['total_s']:.1f} s)"
            ),
        )
        + ". **First round** after the server starts: "
        + each(
            cold,
            lambda r: (
                f"×{r['ratio']:.2f} ({r['service']['latency_s']:.1f} s, of which "
                f"{r['service']['queue_s']:.1f} s queued and "
                f"{r['service']['phases']['load']:.1f} s loading, as it decodes every blob)"
            ),
        )
        + ".",
        "",
    ]


def reading(sizes: list[dict]) -> list[str]:
    """Sentences computed from the figures, so a re-run's report reads true."""
    lines = []
    for entry in sizes:
        for r in entry["rounds"]:
            s, e = r["service"], r["engine"]
            compute = sum(s["phases"][p] for p in ENGINE_PHASES)
            parts = {
                "queue (runner poll)": s["queue_s"],
                "load phase (rows, blobs or cache, standardizing)": s["phases"]["load"],
                "worker other (holdout accuracy, checkpoint, heartbeats)": s["worker_other_s"],
                "publish transaction + client poll": s["publish_and_poll_s"],
                "compute phases against the engine's": compute - e["total_s"],
            }
            extra = s["latency_s"] - e["total_s"]
            ranked = sorted(parts.items(), key=lambda kv: -kv[1])
            lines.append(
                f"- Pool {entry['pool']:,}, round {s['number']}: {s['latency_s']:.1f} s through "
                f"the service against {e['total_s']:.1f} s for the engine (×{r['ratio']:.2f}); "
                f"of the {extra:.1f} s more, "
                + ", ".join(f"{name} {v:.1f} s" for name, v in ranked)
                + "."
            )
    return lines


def write_report(report: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "service.json").write_text(json.dumps(report, indent=1) + "\n")
    load = report["load_average"]
    m = report["machine"]
    lines = [
        "# Round latency through the service, against the engine alone",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        f"{report['what']}. Measured {report['measured']} at commit {report['commit']} on "
        f"{m['processor']}, {m['cpus']} "
        f"CPUs, torch {m['torch']} with {m['torch_threads']} threads, no GPU. Load average "
        f"(1, 5, 15 min) {load['start']} at the start (after waiting "
        f"{load['waited_s']:.0f} s for the 1-minute figure to drop below {load['threshold']}) "
        f"and {load['end']} at the end; each round's is in service.json. The machine is "
        "shared with other jobs, so single runs are noisy: read differences under ~1 s, and "
        "the split between phases, with care.",
        "",
        "**Service latency**: from sending `POST /rounds` to the `GET /rounds/{id}` that "
        f"returns `ready` (polled every {report['settings']['poll_s']} s). **Engine**: "
        "`run_round` alone on the same labeled set, pool and seed, inputs already "
        f"standardized in memory, with the server stopped: the median of "
        f"{report['settings']['engine_repeats']} runs (each in brackets). "
        "**Ratio** = service latency / engine total. "
        "**Outside phases** = latency − the worker's phase timings (load, train, embed, "
        "dual head, select), split by the round's own timestamps into **queue** "
        "(created → claimed by the runner), **worker other** (claimed → finished, outside the "
        "phases) and **publish + poll** (the rest: the POST before the row exists, the "
        "publish transaction after `finished_at` is stamped, and up to one poll interval). "
        "**Same queries**: items both picked; equal sets show the two did the same computation.",
        "",
        *table(report["sizes"]),
        "",
        "Phase split (seconds); the engine's prepare (standardizing the uint8 arrays into "
        "tensors) is the part of the service's load phase that the engine also needs, "
        "and is not in its total.",
        "",
        *phase_table(report["sizes"]),
        "",
        "## Reading",
        "",
        *summary(report["sizes"]),
        *reading(report["sizes"]),
        "",
        "Where each part comes from, in the code:",
        "",
        "- **Queue**: the embedded runner looks for due rounds once a second "
        "(`EmbeddedRunner(poll_seconds=1.0)`), so a round waits up to 1 s to be claimed, plus "
        "the time to start the runner's round process (spawn, then import torch, "
        "scikit-learn and the pipeline) if that is not done yet: at this commit the runner "
        "starts it with the server, so only a round posted within seconds of `ally serve` "
        "would wait for it (here each first round came after the import).",
        "- **Load**: every item row of the pool is read from the database, then every `.npy` "
        "blob is decoded (the first round) or the decoded-pool cache `cache/pool-<id>.npz` is "
        "read (later rounds), and the arrays are standardized into float tensors. The engine "
        "only pays the last step, shown as its prepare time.",
        "- **Worker other**: holdout accuracy on the 10,000 test images, serializing the "
        "checkpoint, the claim and the heartbeats that write phase and progress; the engine's "
        "own holdout-plus-checkpoint time is in service.json (`holdout_and_checkpoint_s`).",
        "- **Publish + poll**: one transaction writes the queries, a dual value for every "
        "labeled and every unlabeled pool item (so it grows with the pool), the model version "
        "and its checkpoint blob; then the client sees `ready` at its next poll.",
        "- Train, embed, dual head and select run the same code on the same inputs in both "
        "(the same queries show it); the service adds only a progress callback per epoch that "
        "writes to the database at most every 10 s, so their differences are mostly the "
        "machine's noise.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "service.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--sizes", default="10000,60000", help="pool sizes, comma-separated")
    parser.add_argument("--labeled", type=int, default=2000, help="random seed labels")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per pool size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-repeats", type=int, default=3, help="engine runs per round")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between GET /rounds")
    parser.add_argument("--quiet-load", type=float, default=1.5, help="start below this load")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    # A plain SIGTERM would skip the finally blocks: the server and the temporary folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not 1 <= args.budget <= 500:  # the queries are read back in one page of at most 500
        raise SystemExit("--budget must lie in 1..500")

    splits = read_mnist(args.data)
    if max(sizes) > len(splits["train"]) or "test" not in splits:
        raise SystemExit(f"{args.data}: need {max(sizes)} training images and a test split")
    waited = wait_for_quiet(args.quiet_load, args.max_wait)
    load_at_start = load_average()
    commit = code_version("worker/bench_service.py")
    measured = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    with tempfile.TemporaryDirectory(prefix="ally-bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        for size in sizes:
            folder = mnist_folder(args.data, splits, size, tmp)
            pool = serve_rounds(splits, folder, size, args, tmp)
            rounds = []
            for served, labeled in zip(pool.rounds, pool.labeled_at, strict=True):
                engine = engine_round(splits, size, labeled, pool.first_id, args)
                same = len(set(engine["query_ids"]) & set(served["query_ids"]))
                ratio = served["latency_s"] / engine["total_s"]
                print(
                    f"pool {size} round {served['number']}: engine {engine['total_s']:.2f} s, "
                    f"ratio {ratio:.2f}, same queries {same}",
                    flush=True,
                )
                rounds.append(
                    {"service": served, "engine": engine, "ratio": ratio, "same_queries": same}
                )
            results.append(
                {
                    "pool": size,
                    "holdout": len(splits["test"]),
                    "import_s": pool.import_s,
                    "rounds": rounds,
                }
            )

    command = ".venv/bin/python -m worker.bench_service " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    report = {
        "command": command.strip(),
        "what": f"ALLY rounds on MNIST pools of {', '.join(f'{s:,}' for s in sizes)} images "
        f"(plus the 10,000 test images as holdout), {args.labeled:,} random seed labels, "
        f"budget {args.budget}, seed {args.seed}, model spec {json.dumps(MODEL_SPEC)} "
        "(MLP 784-256-256-10), `ally serve` with SQLite and the embedded runner, CPU",
        "measured": measured,
        "commit": commit,
        "machine": machine(),
        "load_average": {
            "threshold": args.quiet_load,
            "waited_s": waited,
            "start": load_at_start,
            "end": load_average(),
        },
        "settings": {
            "labeled": args.labeled,
            "budget": args.budget,
            "rounds": args.rounds,
            "seed": args.seed,
            "poll_s": args.poll,
            "engine_repeats": args.engine_repeats,
            "model_spec": MODEL_SPEC,
        },
        "sizes": results,
    }
    text = write_report(report, args.out)
    print(text)


if __name__ == "__main__":
    main()

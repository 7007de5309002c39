"""`ally demo`: the whole product on one machine, driven through its REST API.

It serves the API on localhost (SQLite, embedded runner, no other server), imports a real
dataset, and plays an annotator who keeps the ground truth to itself: for each queried item
it fetches the image, looks it up in its own copy of the dataset, and posts the answer.
The service only ever sees labels it was sent.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import typer
from PIL import Image

from service.datasets import ArrayDataset, packaged, read_mnist


class Annotator:
    """A simulated human: recognises an image by its pixels and answers its true class."""

    def __init__(self, datasets: list[ArrayDataset]):
        self.truth: dict[str, str] = {}
        for ds in datasets:
            for x, y in zip(ds.x, ds.y, strict=True):
                self.truth[_pixels_key(x)] = ds.classes[int(y)]

    def answer(self, image_png: bytes) -> str:
        pixels = np.asarray(Image.open(io.BytesIO(image_png)))
        return self.truth[_pixels_key(pixels)]


def _pixels_key(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def run(
    out: Path,
    data: Path | None,
    rounds: int,
    budget: int,
    strategy: str,
    port: int | None,
) -> list[dict]:
    """Run the demo and return its learning curve."""
    if out.exists():
        shutil.rmtree(out / "data", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLY_")}
    env["ALLY_DATA_DIR"] = str(out / "data")
    ally = [sys.executable, "-m", "worker.cli"]

    admin = _create_key(ally, env, "admin", "demo-admin")
    annotator_key = _create_key(ally, env, "annotator", "demo-annotator")
    port = port or _free_port()
    base = f"http://127.0.0.1:{port}"
    typer.echo(f"serving the API at {base} (Swagger UI: {base}/docs); data in {out / 'data'}")
    server_log = (out / "server.log").open("w")
    server = subprocess.Popen(
        [*ally, "serve", "--port", str(port)], env=env, stdout=server_log, stderr=server_log
    )
    try:
        admin_api = httpx.Client(base_url=base, headers=_bearer(admin), timeout=120)
        annotator_api = httpx.Client(base_url=base, headers=_bearer(annotator_key), timeout=60)
        _wait_until_up(admin_api, server)
        pool_id, annotator = _create_pool(admin_api, ally, env, data)
        curve = []
        for number in range(1, rounds + 1):
            round_ = _run_round(admin_api, pool_id, strategy, budget, number, rounds)
            metrics = round_.get("metrics") or {}
            if "accuracy" in metrics:
                curve.append({"labeled": metrics["labeled"], "accuracy": metrics["accuracy"]})
                typer.echo(
                    f"  trained on {metrics['labeled']} labels: holdout accuracy "
                    f"{metrics['accuracy']:.3f} ({metrics['holdout']} images)"
                )
            if number < rounds:
                labeled = _annotate(annotator_api, round_["id"], annotator)
                typer.echo(f"  the annotator labeled {labeled} images through POST /labels")
        png = admin_api.get(f"/pools/{pool_id}/learning-curve", params={"format": "png"})
        png.raise_for_status()
        (out / "learning-curve.png").write_bytes(png.content)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.close()
    typer.echo("\nlearning curve (labels → holdout accuracy):")
    for point in curve:
        typer.echo(f"  {point['labeled']:>6}  {point['accuracy']:.3f}")
    typer.echo(f"plot: {out / 'learning-curve.png'}")
    return curve


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _create_key(ally: list[str], env: dict[str, str], role: str, name: str) -> str:
    done = subprocess.run(
        [*ally, "keys", "create", "--role", role, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(api: httpx.Client, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the API server exited with code {server.returncode}")
        try:
            if api.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the API server did not become ready in time")


def _create_pool(
    api: httpx.Client, ally: list[str], env: dict[str, str], data: Path | None
) -> tuple[int, Annotator]:
    """A pool with the dataset imported (its test split as holdout) and the annotator's truth."""
    name = "mnist" if data else "mnist-5k"
    pool = api.post(
        "/pools",
        json={
            "name": f"demo-{name}",
            "task": "classification",
            "classes": [str(d) for d in range(10)],
            "input_kind": "image",
            "model_spec": {"network": "mlp"},
        },
    )
    pool.raise_for_status()
    pool_id = pool.json()["id"]
    started = time.perf_counter()
    if data is None:
        imported = api.post(
            f"/pools/{pool_id}/import", json={"dataset": "mnist-5k", "holdout_fraction": 0.2}
        )
        imported.raise_for_status()
        annotator = Annotator(list(packaged("mnist-5k").values()))
    else:  # the operator's import of a local folder of IDX files
        subprocess.run([*ally, "import", "--pool", str(pool_id), str(data)], env=env, check=True)
        annotator = Annotator(list(read_mnist(data).values()))
    counts = api.get(f"/pools/{pool_id}").json()
    typer.echo(
        f"imported {name}: {counts['items']} pool images, "
        f"{counts['holdout']} holdout images with labels, no pool labels "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return pool_id, annotator


def _run_round(
    api: httpx.Client, pool_id: int, strategy: str, budget: int, number: int, rounds: int
) -> dict:
    """POST /rounds, then follow GET /rounds/{id} with a progress bar until it ends."""
    created = api.post("/rounds", json={"pool_id": pool_id, "strategy": strategy, "budget": budget})
    created.raise_for_status()
    round_ = created.json()
    kind = "cold start: k-means coverage" if round_["seeding"] else strategy
    with typer.progressbar(length=100, label=f"round {number}/{rounds} ({kind})") as bar:
        shown = 0
        while round_["status"] in ("queued", "running"):
            time.sleep(0.5)
            round_ = api.get(f"/rounds/{round_['id']}").json()
            percent = int(round_["percent"])
            bar.update(percent - shown)
            shown = percent
    if round_["status"] != "ready":
        raise RuntimeError(f"round {round_['id']} ended {round_['status']}: {round_['error']}")
    return round_


def _annotate(api: httpx.Client, round_id: int, annotator: Annotator) -> int:
    """Fetch leased queries page by page, look at each image, and post the answers."""
    labeled = 0
    while True:
        page = api.get(f"/queries/{round_id}", params={"annotator": "simulated", "limit": 100})
        page.raise_for_status()
        items = [q for q in page.json()["data"] if not q["labeled"]]
        if not items:
            return labeled
        answers = []
        for query in items:
            image = api.get(f"/items/{query['item_id']}/image")
            image.raise_for_status()
            answers.append({"item_id": query["item_id"], "value": annotator.answer(image.content)})
        api.post("/labels", json=answers).raise_for_status()
        labeled += len(answers)

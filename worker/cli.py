"""`ally`: the operator's one entry point."""

from pathlib import Path

import typer

from service import cli as service_cli
from service.settings import settings

app = typer.Typer(
    help="ALLY labeling service: active learning via Lagrangian duality.",
    no_args_is_help=True,
)
app.add_typer(service_cli.keys_app, name="keys")
app.command("import")(service_cli.import_items)


@app.callback()
def main() -> None:
    """ALLY labeling service: active learning via Lagrangian duality."""


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    workers: int = typer.Option(1, help="API server processes"),
    round_processes: int = typer.Option(
        1, help="without ALLY_BROKER_URL: local processes that run rounds"
    ),
) -> None:
    """Run the HTTP API (Swagger UI at /docs); without a broker, also run rounds locally."""
    if settings.broker_url:
        service_cli.serve(host=host, port=port, workers=workers)
        return
    from worker.embedded import EmbeddedRunner

    with EmbeddedRunner(processes=round_processes):
        service_cli.serve(host=host, port=port, workers=workers)


@app.command()
def worker(
    queues: str = typer.Option("gpu", help="comma-separated Celery queues to consume"),
    concurrency: int = typer.Option(1, help="rounds run at once by this worker"),
    loglevel: str = typer.Option("info", help="Celery log level"),
) -> None:
    """Run a Celery worker for rounds (needs ALLY_BROKER_URL)."""
    if not settings.broker_url:
        raise typer.BadParameter("set ALLY_BROKER_URL (e.g. redis://127.0.0.1:6379/0) first")
    from worker.celery_app import app as celery

    celery.worker_main(
        ["worker", f"--queues={queues}", f"--concurrency={concurrency}", f"--loglevel={loglevel}"]
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), help="folder for the data and the plot"),
    data: Path | None = typer.Option(
        None, help="a folder of MNIST IDX files to use instead of the 5,000 packaged images"
    ),
    rounds: int = typer.Option(6, min=2, help="rounds, the first one a cold start"),
    budget: int = typer.Option(100, min=1, help="images queried per round"),
    strategy: str = typer.Option("ally", help="query strategy"),
    port: int | None = typer.Option(None, help="API port (default: a free one)"),
) -> None:
    """Run the whole active-learning loop through the REST API and plot the learning curve."""
    from worker.demo import run

    run(out, data, rounds, budget, strategy, port)


@app.command()
def bench(
    dataset: str = typer.Option(..., help="mnist, cifar10, parkinsons, digits, diabetes, mnist-5k"),
    strategies: str = typer.Option(
        "ally,random", help="comma-separated; parameters as name:key=value+key=value"
    ),
    init: int = typer.Option(200, help="initial random labeled set"),
    budget: int = typer.Option(200, help="items queried per round"),
    rounds: int = typer.Option(5, help="query rounds after the initial one"),
    seeds: int = typer.Option(3, help="seeds 0..N-1"),
    data: str | None = typer.Option(None, help="path to the dataset files"),
    pool_size: int | None = typer.Option(None, help="random subset of the training pool"),
    network: str = typer.Option("auto", help="auto, mlp or resnet18"),
    out: Path = typer.Option(..., help="folder for results.json, curves.png and table.md"),
    headline: str | None = typer.Option(
        None, help="comma-separated strategies to plot alone as headline.png"
    ),
) -> None:
    """Learning curves of strategies on a real dataset, with a simulated annotator."""
    from worker.ally import bench as learning_curves

    chosen = [s.strip() for s in (headline or "").split(",") if s.strip()]
    try:
        for name in chosen:  # a typo fails now, not after the whole benchmark
            learning_curves.parse_strategy(name)
    except ValueError as error:
        raise typer.BadParameter(f"--headline: {error}") from error
    spec = learning_curves.BenchSpec(
        dataset=dataset,
        strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
        init=init,
        budget=budget,
        rounds=rounds,
        seeds=seeds,
        data=data,
        pool_size=pool_size,
        network=network,
    )
    try:
        results = learning_curves.run(spec, out, log=typer.echo)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    learning_curves.plot(results, out / "curves.png")
    rows = learning_curves.summarize(results)
    markdown = learning_curves.table(rows, results["metric"])
    (out / "table.md").write_text(markdown + "\n")
    typer.echo(markdown)
    if chosen:
        unknown = set(chosen) - {r["strategy"] for r in results["runs"]}
        if unknown:
            raise typer.BadParameter(f"--headline: no results for {sorted(unknown)}")
        learning_curves.plot(results, out / "headline.png", chosen)


if __name__ == "__main__":
    app()

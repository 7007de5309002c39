"""`ally`: the operator's one entry point."""

from pathlib import Path

import typer

app = typer.Typer(
    help="ALLY labeling service: active learning via Lagrangian duality.",
    no_args_is_help=True,
)


@app.callback()
def main() -> None:
    """ALLY labeling service: active learning via Lagrangian duality."""


@app.command()
def demo() -> None:
    """Run the whole active-learning loop on a real dataset and plot the learning curve."""
    typer.echo(
        "ally demo: the learning engine and the service are still being built; "
        "this command will run the full loop once they exist."
    )


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
) -> None:
    """Learning curves of strategies on a real dataset, with a simulated annotator."""
    from worker.ally import bench as learning_curves

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

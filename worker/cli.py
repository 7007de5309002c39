"""`ally`: the operator's one entry point."""

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

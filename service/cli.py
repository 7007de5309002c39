"""The operator's commands for the service, registered on `ally` by worker/cli.py:
`ally keys create|list|revoke`, `ally serve`, and `ally import`."""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from sqlmodel import Session

from service import archives
from service.auth import create_key, key_pools, list_keys, revoke_key
from service.blobs import FileBlobStore
from service.crud import get_pool
from service.db import get_engine, migrate
from service.errors import ServiceError
from service.importing import import_dataset, read_folder
from service.models import Role
from service.settings import settings

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)


@contextmanager
def _session() -> Iterator[Session]:
    """The migrated database, in one transaction committed if the command succeeds."""
    migrate()
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session
        session.commit()


def _fail(message: str) -> None:
    typer.secho(message, err=True, fg=typer.colors.RED)
    raise typer.Exit(code=1)


@keys_app.command("create")
def keys_create(
    role: Role = typer.Option(..., help="admin or annotator"),
    name: str = typer.Option(..., help="who or what uses the key, e.g. alice"),
    pools: list[int] | None = typer.Option(
        None, "--pool", help="restrict an annotator key to this pool (repeat for several)"
    ),
) -> None:
    """Create an API key and print it; it is shown only this once."""
    try:
        with _session() as session:
            row, key = create_key(session, name=name, role=role, pools=pools or ())
    except ServiceError as e:
        _fail(str(e.detail))
    scope = f"pools {sorted(set(pools))}" if pools else "every pool"
    typer.echo(key)
    typer.echo(
        f"key {row.id} ({row.role}, {row.name}, {scope}); it is not stored: keep it now", err=True
    )


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (never the keys themselves)."""
    with _session() as session:
        rows = list_keys(session)
        restrictions = key_pools(session, rows)
    for row, pools in zip(rows, restrictions, strict=True):
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        scope = "pools " + ",".join(map(str, pools)) if pools else "every pool"
        typer.echo(f"{row.id}\t{row.role}\t{row.name}\t{row.prefix}...\t{scope}\t{state}")


@keys_app.command("revoke")
def keys_revoke(key_id: int = typer.Argument(..., help="the id shown by `ally keys list`")) -> None:
    """Revoke an API key."""
    with _session() as session:
        row = revoke_key(session, key_id)
    if row is None:
        _fail(f"no API key {key_id}")
    typer.echo(f"revoked key {key_id}")


def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    workers: int = typer.Option(1, help="server processes"),
) -> None:
    """Run the HTTP API (Swagger UI at /docs)."""
    import uvicorn

    uvicorn.run("service.app:app", host=host, port=port, workers=workers)


def import_items(
    path: Path = typer.Argument(
        ...,
        exists=True,
        help="a folder (or zip/tar of one) of IDX files, or of images in one sub-folder per class",
    ),
    pool: int = typer.Option(..., "--pool", help="the pool's id"),
    with_labels: bool = typer.Option(False, help="store the pool split's labels as seed labels"),
    holdout_fraction: float = typer.Option(
        0.0, min=0.0, max=0.99, help="share set aside as holdout when there is no test split"
    ),
    seed: int = typer.Option(0, help="seed of the holdout split"),
) -> None:
    """Import a local dataset folder or archive into a pool (a test/ split becomes the holdout)."""
    try:
        with _session() as session, tempfile.TemporaryDirectory(prefix="ally-import-") as tmp:
            target = get_pool(session, pool)
            folder = path
            if path.is_file():
                with path.open("rb") as archive:
                    archives.extract(
                        archive,
                        Path(tmp),
                        max_bytes=settings.max_archive_unpacked_bytes,
                        max_members=settings.max_archive_members,
                    )
                folder = Path(tmp)
            splits = read_folder(folder, settings.max_image_pixels)
            result = import_dataset(
                session,
                FileBlobStore(settings.blob_dir),
                target,
                splits,
                source=path.name,
                with_labels=with_labels,
                holdout_fraction=holdout_fraction,
                seed=seed,
            )
    except ServiceError as e:
        _fail(str(e.detail))
    added = ", ".join(f"{n} to {split}" for split, n in result.added.items())
    typer.echo(
        f"pool {pool}: added {added}; {result.duplicates} duplicates; {result.labels} labels"
    )

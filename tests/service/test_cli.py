"""`ally keys`, `ally import` and `ally serve`, run through typer on a temporary database."""

import io
import zipfile
from pathlib import Path

import pytest
import typer
from PIL import Image
from sqlmodel import Session, select
from typer.testing import CliRunner

from service import cli
from service.auth import find_key
from service.db import get_engine, migrate
from service.models import ApiKey, Item, Label, Pool, Split
from service.settings import settings

# Registered as worker/cli.py registers them on `ally`.
app = typer.Typer()
app.add_typer(cli.keys_app, name="keys")
app.command("import")(cli.import_items)
app.command("serve")(cli.serve)
runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's own SQLite database and blobs, under a fresh data directory."""
    monkeypatch.setattr(settings, "data_dir", tmp_path)
    monkeypatch.setattr(settings, "database_url", None)
    return tmp_path


def test_keys_create_list_revoke(data_dir: Path) -> None:
    created = runner.invoke(app, ["keys", "create", "--role", "annotator", "--name", "alice"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert key.startswith("ally_")
    with Session(get_engine()) as session:
        row = find_key(session, key)
        assert row is not None and row.role == "annotator"
        assert key not in {r.key_hash for r in session.exec(select(ApiKey))}
    listed = runner.invoke(app, ["keys", "list"])
    assert "alice" in listed.stdout and "active" in listed.stdout and key not in listed.stdout
    assert "every pool" in created.output and "\tevery pool\tactive" in listed.stdout
    assert runner.invoke(app, ["keys", "revoke", str(row.id)]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list"]).stdout
    with Session(get_engine()) as session:
        assert find_key(session, key) is None
    assert runner.invoke(app, ["keys", "revoke", "999"]).exit_code == 1


def test_keys_create_refuses_unknown_roles(data_dir: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "--role", "root", "--name", "x"])
    assert result.exit_code != 0


def _pools(*names: str) -> list[int]:
    migrate()
    with Session(get_engine()) as session:
        pools = [Pool(name=n, task="regression", input_kind="vector") for n in names]
        session.add_all(pools)
        session.commit()
        return [pool.id for pool in pools]  # type: ignore[misc]


def test_keys_create_restricts_an_annotator_to_pools(data_dir: Path) -> None:
    first, second, _ = _pools("a", "b", "c")
    pool_flags = ["--pool", str(second), "--pool", str(first)]
    created = runner.invoke(
        app, ["keys", "create", "--role", "annotator", "--name", "bo", *pool_flags]
    )
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    with Session(get_engine()) as session:
        row = find_key(session, key)
        assert row is not None and row.pools == {first, second}
    listed = runner.invoke(app, ["keys", "list"]).stdout
    assert f"bo\t{key[:11]}...\tpools {first},{second}\tactive" in listed


@pytest.mark.parametrize(
    ("role", "pools", "message"),
    [
        ("annotator", ["1", "41", "42"], "no pools [41, 42]"),
        ("admin", ["1"], "an admin key sees every pool"),
    ],
)
def test_keys_create_refuses_bad_pools_and_stores_nothing(
    data_dir: Path, role: str, pools: list[str], message: str
) -> None:
    _pools("a")
    flags = [arg for pool in pools for arg in ("--pool", pool)]
    result = runner.invoke(app, ["keys", "create", "--role", role, "--name", "x", *flags])
    assert result.exit_code == 1 and message in result.output
    with Session(get_engine()) as session:
        assert session.exec(select(ApiKey)).all() == []


def test_import_a_local_image_folder(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    shades = iter(range(0, 256, 40))  # six different images (hash() differs between runs)
    for split, names in (("train", ("a", "b")), ("test", ("c",))):
        for label in ("0", "1"):
            (folder / split / label).mkdir(parents=True)
            for name in names:
                Image.new("L", (4, 4), color=next(shades)).save(
                    folder / split / label / f"{name}.png"
                )
    migrate()
    with Session(get_engine()) as session:
        pool = Pool(name="shapes", task="classification", classes=["0", "1"], input_kind="image")
        session.add(pool)
        session.commit()
        pool_id = pool.id
    result = runner.invoke(app, ["import", "--pool", str(pool_id), str(folder)])
    assert result.exit_code == 0, result.output
    assert "added 4 to pool, 2 to holdout" in result.stdout
    with Session(get_engine()) as session:
        items = session.exec(select(Item).where(Item.pool_id == pool_id)).all()
        assert sorted(i.split for i in items) == [Split.holdout] * 2 + [Split.pool] * 4
        assert len(session.exec(select(Label)).all()) == 2
    assert (data_dir / "blobs").is_dir()


def test_import_into_an_unknown_pool_fails_cleanly(data_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", "--pool", "42", str(tmp_path)])
    assert result.exit_code == 1 and "no pool 42" in result.output


def test_serve_runs_uvicorn_on_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append((a, k)))
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--port", "9000"])
    assert result.exit_code == 0, result.output
    assert calls == [(("service.app:app",), {"host": "0.0.0.0", "port": 9000, "workers": 1})]


def test_import_a_local_archive(data_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for label in ("0", "1"):
            buffer = io.BytesIO()
            Image.new("L", (4, 4), color=int(label) * 200).save(buffer, format="PNG")
            z.writestr(f"digits/{label}/x.png", buffer.getvalue())
    migrate()
    with Session(get_engine()) as session:
        pool = Pool(name="zip", task="classification", classes=["0", "1"], input_kind="image")
        session.add(pool)
        session.commit()
        pool_id = pool.id
    result = runner.invoke(app, ["import", "--pool", str(pool_id), str(archive), "--with-labels"])
    assert result.exit_code == 0, result.output
    assert "added 2 to pool, 0 to holdout; 0 duplicates; 2 labels" in result.stdout

"""The blob store, the migrations, and archive extraction, below the HTTP layer."""

import io
import tarfile
import zipfile
from collections.abc import Sequence

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text
from sqlmodel import Session, SQLModel, select

from service.archives import extract
from service.auth import key_pools
from service.blobs import FileBlobStore, blob_key
from service.db import alembic_config
from service.errors import InvalidArchive, PayloadTooLarge
from service.models import ApiKey


def test_blobs_are_content_addressed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = FileBlobStore(tmp_path)
    key = store.put(b"hello")
    assert key == blob_key(b"hello") and len(key) == 64
    assert store.put(b"hello") == key  # idempotent
    assert store.get(key) == b"hello" and store.exists(key)
    path = store.path(key)
    assert path is not None and path.read_bytes() == b"hello" and tmp_path in path.parents
    assert not store.exists(blob_key(b"other")) and store.path(blob_key(b"other")) is None
    with pytest.raises(KeyError):
        store.get(blob_key(b"other"))
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("key", ["../../etc/passwd", "ab", "A" * 64, "/" + "a" * 63])
def test_blob_keys_never_become_arbitrary_paths(tmp_path, key: str) -> None:  # type: ignore[no-untyped-def]
    store = FileBlobStore(tmp_path)
    with pytest.raises(KeyError):
        store.get(key)
    with pytest.raises(KeyError):
        store.exists(key)


def test_the_migrations_create_exactly_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
        tables = set(inspect(connection).get_table_names())
    assert {"pools", "items", "labels", "rounds", "queries", "model_versions"} <= tables
    assert {"dual_values", "api_keys", "alembic_version"} <= tables


def test_the_pool_split_index_exists(engine: Engine) -> None:
    with engine.connect() as connection:
        indexes = {i["name"]: i["column_names"] for i in inspect(connection).get_indexes("items")}
    assert indexes["ix_items_pool_id_split"] == ["pool_id", "split"]


def _migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def _insert_key(connection: Connection, name: str, pools: Sequence[int] = ()) -> int:
    """A key row as the old revisions store it (the current model has more columns)."""
    key_id = connection.execute(
        text(
            "INSERT INTO api_keys (name, role, key_hash, prefix, created_at) "
            "VALUES (:name, 'annotator', :hash, 'ally_x', CURRENT_TIMESTAMP) RETURNING id"
        ),
        {"name": name, "hash": name * 8},
    ).scalar_one()
    for pool_id in pools:
        connection.execute(
            text("INSERT INTO api_key_pools (key_id, pool_id) VALUES (:key, :pool)"),
            {"key": key_id, "pool": pool_id},
        )
    return key_id


def test_pool_restricted_keys_migrate_up_and_down(empty_engine: Engine) -> None:
    _migrate(empty_engine, "0003")
    with empty_engine.begin() as connection:
        pool_id = connection.execute(
            text(
                "INSERT INTO pools (name, task, input_kind, model_spec, default_strategy, "
                "default_budget, created_at) VALUES ('p', 'regression', 'vector', '{}', "
                "'ally', 100, CURRENT_TIMESTAMP) RETURNING id"
            )
        ).scalar_one()
        _insert_key(connection, "old")
    _migrate(empty_engine, "0004")
    with empty_engine.begin() as connection:
        _insert_key(connection, "new", [pool_id])
    # Down: the restricted key would see every pool, so it is revoked instead.
    _migrate(empty_engine, "0003", down=True)
    with empty_engine.connect() as connection:
        assert "api_key_pools" not in inspect(connection).get_table_names()
        revoked = dict(connection.execute(text("SELECT name, revoked_at FROM api_keys")).all())
    assert revoked["old"] is None and revoked["new"] is not None
    # Up again: keys restricted before 0006 are marked restricted, the others are not.
    _migrate(empty_engine, "0005")
    with empty_engine.begin() as connection:
        _insert_key(connection, "newer", [pool_id])
    _migrate(empty_engine, "head")
    with Session(empty_engine) as session:
        keys = {key.name: key for key in session.exec(select(ApiKey))}
        assert {name: key.restricted for name, key in keys.items()} == {
            "old": False,
            "new": False,  # revoked by the downgrade, its pool rows dropped with the table
            "newer": True,
        }
        assert key_pools(session, [keys["old"], keys["newer"]]) == [None, [pool_id]]
    _migrate(empty_engine, "0005", down=True)
    with empty_engine.connect() as connection:
        columns = {column["name"] for column in inspect(connection).get_columns("api_keys")}
    assert "restricted" not in columns
    _migrate(empty_engine, "head")


def _zip(files: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def test_extract_keeps_the_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    extract(_zip({"a/b.txt": b"1", "a/c/d.txt": b"22"}), tmp_path, max_bytes=10, max_members=5)
    assert (tmp_path / "a" / "c" / "d.txt").read_bytes() == b"22"


def test_extract_counts_real_bytes_and_members(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PayloadTooLarge):
        extract(_zip({"big": b"\0" * 1000}), tmp_path / "x", max_bytes=999, max_members=5)
    with pytest.raises(PayloadTooLarge):
        extract(_zip({str(i): b"" for i in range(6)}), tmp_path / "y", max_bytes=10, max_members=5)


def test_extract_refuses_paths_out_of_the_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArchive):
        extract(_zip({"a/../../escape": b"1"}), tmp_path / "z", max_bytes=10, max_members=5)
    assert not (tmp_path / "escape").exists()


# Compressible (so deflate codes it with Huffman tables, which corruption breaks), not trivially.
_TEXT = np.random.default_rng(0).integers(97, 101, 100_000, dtype=np.uint8).tobytes()


def _corrupt(data: bytes, at: float) -> io.BytesIO:
    """`data` with 8 bytes flipped at the fraction `at` of its length."""
    damaged = bytearray(data)
    start = int(len(damaged) * at)
    for i in range(start, start + 8):
        damaged[i] ^= 0xFF
    return io.BytesIO(bytes(damaged))


def _tar(mode: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        member = tarfile.TarInfo("data/a.bin")
        member.size = len(payload)
        archive.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def _encrypted_zip() -> io.BytesIO:
    """A zip whose member claims to be encrypted (flag bit 0)."""
    data = bytearray(_zip({"a.txt": b"secret"}).getvalue())
    central = data.rindex(b"PK\x01\x02")
    data[central + 8] |= 0x01  # general purpose flags of the central directory entry
    return io.BytesIO(bytes(data))


@pytest.mark.parametrize(
    "archive",
    [
        lambda: _corrupt(_zip({"a.txt": _TEXT}).getvalue(), 0.5),  # zlib.error
        lambda: _corrupt(_tar("w:gz", _TEXT), 0.3),  # zlib.error
        lambda: _corrupt(_tar("w:xz", np.random.default_rng(0).bytes(200_000)), 0.97),  # LZMA
        lambda: io.BytesIO(_tar("w:gz", b"abc" * 50_000)[:-100]),  # EOFError
        _encrypted_zip,  # RuntimeError
    ],
    ids=["corrupt zip", "corrupt gzip", "corrupt xz", "truncated gzip", "encrypted zip"],
)
def test_corrupt_compressed_data_is_an_invalid_archive(tmp_path, archive) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArchive):
        extract(archive(), tmp_path / "d", max_bytes=10**7, max_members=5)
    assert not (tmp_path / "d").exists()

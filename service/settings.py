"""Every setting of the service and the workers, read once from ALLY_* environment variables."""

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLY_", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")
    # Unset: a SQLite file under data_dir.
    database_url: str | None = None
    # Connections each process keeps open to a server database (PostgreSQL). No more API
    # requests than this hold a session at once: the others wait their turn before taking one.
    db_pool_size: int = 10
    # Unset: rounds run in the embedded local process pool instead of Celery.
    broker_url: str | None = None

    # Request limits. A body over max_body_bytes is refused before it is read.
    max_body_bytes: int = 256 * MiB
    max_image_bytes: int = 20 * MiB
    # Checked from the image header, before any pixel is decoded (decompression bombs).
    max_image_pixels: int = 25_000_000
    max_files_per_upload: int = 1000
    # Archives uploaded to /pools/{id}/import: limits on what they unpack to.
    max_archive_unpacked_bytes: int = 1024 * MiB
    max_archive_members: int = 200_000

    # A key revoked elsewhere (another process, `ally keys revoke`) is refused at most this
    # long after: an API process trusts a key it found live for this long, and on PostgreSQL
    # for as long as its change feed has been heard within this long (service/auth.py).
    # 0: look up every time.
    key_cache_seconds: float = 1.0

    # How long GET /queries/{round}?annotator=NAME reserves items for that annotator.
    lease_seconds: int = 15 * 60
    # Below this many labeled pool items a round starts cold (k-means coverage seeding).
    min_labeled: int = 20

    # Workers: a round's lease lasts this long unless its worker's heartbeat renews it; a
    # round whose worker stopped responding is run again, at most round_max_attempts times.
    round_lease_seconds: int = 60
    round_max_attempts: int = 3
    # Celery: hard limit on one round, below the broker's redelivery (visibility) timeout.
    round_time_limit_seconds: int = 3 * 3600
    broker_visibility_timeout_seconds: int = 4 * 3600

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ally.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


settings = Settings()

"""Every setting of the service and the workers, read once from ALLY_* environment variables."""

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLY_", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")
    # Unset: a SQLite file under data_dir.
    database_url: str | None = None
    # Unset: rounds run in the embedded local process pool instead of Celery.
    broker_url: str | None = None

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ally.db'}"


settings = Settings()

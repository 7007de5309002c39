from pathlib import Path

from service.settings import Settings


def test_defaults_mean_sqlite_under_the_data_dir_and_no_broker(monkeypatch):
    for name in ("ALLY_DATABASE_URL", "ALLY_BROKER_URL", "ALLY_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.database == f"sqlite:///{Path('data') / 'ally.db'}"
    assert settings.broker_url is None


def test_environment_overrides_the_defaults(monkeypatch):
    monkeypatch.setenv("ALLY_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/test")
    monkeypatch.setenv("ALLY_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = Settings(_env_file=None)
    assert settings.database.startswith("postgresql+psycopg://")
    assert settings.broker_url == "redis://127.0.0.1:6379/0"

import pytest

from dit_fast.checkpoint import official


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # No checkpoint test may read the user's cache or reach the real server.
    monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / "default_cache"))
    monkeypatch.setenv(official.BASE_URL_ENV, "http://127.0.0.1:9/never-used/")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

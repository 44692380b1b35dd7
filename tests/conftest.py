"""Hypothesis profiles: local runs explore new random examples each time; CI
(`HYPOTHESIS_PROFILE=ci`, set by `.ci/run`) replays a fixed derandomised set so a merge is
never blocked by a new example that appeared by chance; the slow run explores further."""
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _private_tuning_database(tmp_path_factory, monkeypatch):
    """Every test gets its own shared tuning database: a build never picks up records another
    test (or the user's own runs in ~/.cache) tuned."""
    monkeypatch.setenv("GRAPHPRUNE_TUNING_DB", str(tmp_path_factory.mktemp("shared-tuning-db")))

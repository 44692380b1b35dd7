"""Hypothesis profiles: local runs explore new random examples each time; CI
(`HYPOTHESIS_PROFILE=ci`, set by `.ci/run`) replays a fixed derandomised set so a merge is
never blocked by a new example that appeared by chance; the slow run explores further."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

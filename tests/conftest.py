"""Shared test setup: quiet TensorFlow logs and a fixtures path."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Autotuning results stay in memory: tests never write the user's cache file.
os.environ.setdefault("TF_DIFFUSION_AUTOTUNE_CACHE", "")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> pathlib.Path:
    return FIXTURES

"""Fixtures and test-session setup only; helpers the tests import live in helpers.py (and the
other *_helpers.py modules)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ROOT  # noqa: E402  (tests/ is on sys.path from here)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic identity dataset (40 identities x 10 JPEGs of 32x32, 2 shards) with its
    verification.bin, written once per session by the pipelines' own writer."""
    from pipelines.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synth(
        str(out), SynthConfig(identities=40, images_per_identity=10, size=32, verification_pairs=40), num_shards=2
    )
    return out

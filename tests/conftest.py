"""Shared fixtures: the real sample data folder and tiny random SAM3 models.

The samples live outside the repository (``../shared/data`` beside the checkout, or ``$MEDSAM3_DATA``).
Every test that needs them carries the ``needs_data`` marker: added here to each test that uses the
``data_dir`` fixture (directly or through other fixtures), set by hand on tests that read the folder some
other way. Without the folder those tests skip (``pytest -m "not needs_data"`` runs the others), unless
``MEDSAM3_REQUIRE_DATA=1`` (as in CI): then the session stops before the first test with an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSAM3_DATA") or REPO.parent / "shared" / "data")
NEEDS_DATA = "needs_data"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def data_required() -> bool:
    """Whether missing sample data is an error (``MEDSAM3_REQUIRE_DATA=1``, set by CI) instead of a skip."""
    return os.environ.get("MEDSAM3_REQUIRE_DATA", "").strip().lower() not in ("", "0", "false", "no")


def missing_data_message() -> str:
    """The error when the data is required but absent: the folder looked at and how to point elsewhere."""
    return (
        f"sample data not found at {DATA}, and MEDSAM3_REQUIRE_DATA=1 makes that an error: put the "
        "samples in ../shared/data beside the checkout or set MEDSAM3_DATA to their folder "
        '(or run only the tests that work without it: pytest -m "not needs_data")'
    )


def skip_or_fail_without_data() -> None:
    """Skip (developers without the samples) or fail (``MEDSAM3_REQUIRE_DATA=1``) when the data is missing."""
    if DATA.is_dir():
        return
    if data_required():
        pytest.fail(missing_data_message(), pytrace=False)
    pytest.skip(f"sample data not found at {DATA} (set MEDSAM3_DATA)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test that uses ``data_dir`` (before ``-m`` selects, hence ``tryfirst``)."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker(NEEDS_DATA) is None:
            item.add_marker(NEEDS_DATA)


def pytest_collection_finish(session):
    """With ``MEDSAM3_REQUIRE_DATA=1``, stop before any test runs when a selected test needs missing data."""
    if session.config.option.collectonly or DATA.is_dir() or not data_required():
        return
    needing = sum(1 for item in session.items if item.get_closest_marker(NEEDS_DATA) is not None)
    if needing:
        pytest.exit(
            f"{needing} selected test(s) need the sample data; {missing_data_message()}",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_runtest_setup(item):
    if item.get_closest_marker(NEEDS_DATA) is not None:
        skip_or_fail_without_data()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real sample images (see its README for the catalogue and licenses)."""
    skip_or_fail_without_data()
    return DATA


@pytest.fixture(scope="session")
def tiny_config():
    """A tiny random SAM3 image-model configuration (224 px, 8 queries)."""
    from medsam3.model.configs import tiny_sam3_config

    return tiny_sam3_config()


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    """The tiny model folder of the ``medsam3 serve`` tests (``serve_fixtures.build_model``), built once."""
    from serve_fixtures import build_model

    return build_model(tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """A tiny ``Sam3Model`` with seeded random weights, in eval mode."""
    import torch
    from transformers import Sam3Model

    torch.manual_seed(0)
    return Sam3Model(tiny_config).eval()

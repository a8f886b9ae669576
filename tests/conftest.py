"""Shared fixtures: the real sample data folder and tiny random SAM3 models.

The samples live outside the repository (``../shared/data`` beside the checkout, or ``$MEDSAM3_DATA``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSAM3_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real sample images (see its README for the catalogue and licenses)."""
    if not DATA.is_dir():
        pytest.skip(f"sample data not found at {DATA} (set MEDSAM3_DATA)")
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

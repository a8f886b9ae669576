"""The stored listing of Meta's SAM3 state-dict keys is exactly what Meta's ``sam3`` package builds.

``tests/model_meta_sam3_keys.tsv`` drives the fast conversion tests (the inverse layout of
``tests/model_meta_layout.py`` must reproduce it). Here Meta's video model (detector + tracker, the layout
of ``sam3.pt``) is built by Meta's own builder with every parameter placed on the meta device as it is
registered, so the build takes seconds and little memory, and its state-dict keys, shapes and dtypes are
compared with the listing. Needs the PyPI package ``sam3`` (``pip install sam3 --no-deps`` plus timm,
ftfy, regex, iopath, einops, psutil, pycocotools).

Run: ``pytest -m slow tests/slow/test_meta_keys.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from model_meta_layout import read_meta_listing  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.slow


def _cpu(value):
    if isinstance(value, (str, torch.device)) and str(value).startswith("cuda"):
        return "cpu"
    return value


class _CudaToCpu(TorchFunctionMode):
    """Meta's builder names the ``cuda`` device for a few caches; build them on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: _cpu(v) for k, v in (kwargs or {}).items()}
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to":
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


def _meta_parameters(module: nn.Module, name: str, param) -> None:
    _ORIGINAL_REGISTER(module, name, param)
    if param is not None:
        p = module._parameters[name]
        module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


_ORIGINAL_REGISTER = nn.Module.register_parameter


def _meta_video_state_dict() -> dict[str, torch.Tensor]:
    import open_clip
    from sam3.model_builder import build_sam3_video_model

    bpe = str(Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz"))
    nn.Module.register_parameter = _meta_parameters
    try:
        with _CudaToCpu():
            model = build_sam3_video_model(load_from_HF=False, device="meta", bpe_path=bpe)
    finally:
        nn.Module.register_parameter = _ORIGINAL_REGISTER
    return model.state_dict()


def test_listing_matches_metas_model():
    if importlib.util.find_spec("sam3") is None:
        pytest.skip("Meta's SAM3 package `sam3` is not installed")
    state = _meta_video_state_dict()
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    expected = read_meta_listing()
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: got[k] for k in got if got[k] != expected[k]} == {}
    assert sum(k.startswith("detector.") for k in got) == 1156
    assert sum(k.startswith("tracker.") for k in got) == 309

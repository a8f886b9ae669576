"""The label maps of the bundled samples and fixtures stay byte-identical (``golden_cases``).

The expected fingerprints were computed by ``tests/golden_cases.py --write`` before the inference engine
was reshaped; any change in a label map, its dtype or shape, or in which label went absent and why, fails
here and names the case.
"""

from __future__ import annotations

import json

import pytest

from golden_cases import CASES, GOLDEN, run_case


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", sorted(CASES))
def test_label_maps_are_byte_identical(name, work, serve_model):
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))[name]
    got = run_case(name, work, serve_model)
    assert got["label_maps"] == expected["label_maps"], name
    assert got["labels"] == expected["labels"], name

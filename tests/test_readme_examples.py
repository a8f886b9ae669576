"""The README's Python examples run as written (from a folder where ``src/`` is the package's sources, as in
a checkout), with the bundled model on the CPU."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_examples_and_starts_with_the_one_call_api():
    assert len(BLOCKS) >= 2
    assert "medsam3.segment(" in BLOCKS[0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    (tmp_path / "src").symlink_to(README.parent / "src")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.toml").write_text("", encoding="utf-8")  # no configured model: the bundled one
    monkeypatch.setenv("MEDSAM3_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("MEDSAM3_MODEL", raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"}
        )
    assert out.getvalue().strip(), "every example prints what it found"
    if "write(" in BLOCKS[index]:
        assert any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    assert os.getcwd() == str(tmp_path)

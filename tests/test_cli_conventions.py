"""Command-line conventions of the field: ``-i/--input``, ``--device cpu|cuda|cuda:N|mps|auto``, and
``-v`` / ``-q`` after every subcommand as well as before it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

import medsam3
from medsam3.cli import build_parser, main

HC18 = Path(medsam3.__file__).parent / "assets" / "samples" / "hc18_400_HC.png"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_takes_verbose_and_quiet():
    commands = _subparsers(build_parser())
    assert set(commands) >= {"info", "preview", "segment", "convert", "prepare", "train", "evaluate", "serve"}
    for name, sub in commands.items():
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, name


def test_verbosity_before_or_after_the_subcommand(monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["-v", "info", str(HC18)]).verbose is True
    after = parser.parse_args(["info", str(HC18), "-v"])
    assert after.verbose is True and after.quiet is False
    assert parser.parse_args(["info", str(HC18), "-q"]).quiet is True
    plain = parser.parse_args(["info", str(HC18)])
    assert plain.verbose is False and plain.quiet is False
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    assert main(["info", str(HC18), "-q"]) == 0
    assert main(["info", str(HC18), "--verbose"]) == 0
    assert levels == [logging.WARNING, logging.DEBUG]
    assert main(["info", str(HC18), "-v", "-q"]) == 2  # one or the other


def test_input_as_option_or_positional(tmp_path, capsys):
    assert (
        main(["segment", "-i", str(HC18), "-p", "fetal head", "-o", str(tmp_path / "a"), "--device", "cpu"])
        == 0
    )
    assert main(["segment", str(HC18), "-p", "fetal head", "-o", str(tmp_path / "b"), "--device", "cpu"]) == 0
    a = (tmp_path / "a" / "hc18_400_HC_mask.png").read_bytes()
    assert a == (tmp_path / "b" / "hc18_400_HC_mask.png").read_bytes()
    capsys.readouterr()
    assert main(["segment", str(HC18), "-i", str(HC18), "-p", "x", "-o", str(tmp_path / "c")]) == 2
    assert "give the input once" in capsys.readouterr().err
    assert main(["segment", "-p", "x", "-o", str(tmp_path / "d")]) == 2
    assert "(none given)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_device_names(tmp_path, capsys):
    parser = build_parser()
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert (
            parser.parse_args(["segment", str(HC18), "-p", "x", "-o", "o", "--device", name]).device == name
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", str(HC18), "-p", "x", "-o", "o", "--device", "gpu1"])
    assert "expected auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the loader names what is missing; nothing is written
        assert (
            main(["segment", str(HC18), "-p", "fetal head", "-o", str(tmp_path / "o"), "--device", "cuda:1"])
            == 2
        )
        assert "--device cuda:1: no CUDA GPU is available" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()

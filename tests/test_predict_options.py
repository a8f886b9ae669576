"""Inference options declared once (``medsam3.predict.options``): values, rules, and the front ends made
from them.

Three levels: values and rules by hand; the command line, the HTTP API and Python built from the same
declarations (same flags, defaults and ranges); and the same message for the same invalid combination
from ``medsam3 segment``, the server and ``Segmenter`` (tiny random model for the server and Python).
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest

from medsam3.errors import OptionError, PromptError
from medsam3.predict.options import (
    FRONT_DEFAULTS,
    RULES,
    SegmentOptions,
    VolumeOptions,
    build_options,
    check_request,
    default_of,
    option_fields,
)


# -- values, by hand --------------------------------------------------------------------------------------
def test_defaults_are_the_papers_rule():
    o = VolumeOptions()
    assert (o.threshold, o.presence_threshold, o.instances, o.tta, o.image_size) == (
        0.1,
        0.5,
        False,
        False,
        None,
    )
    assert (o.mode, o.axis, o.slice_batch, o.min_slices, o.fill_holes, o.probes) == (
        "slices",
        None,
        4,
        1,
        True,
        8,
    )
    assert (
        default_of("presence_threshold", "evaluate")
        == 0.0
        == FRONT_DEFAULTS["evaluate"]["presence_threshold"]
    )
    assert default_of("presence_threshold", "segment") == 0.5


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(threshold=1.5), "threshold must be between 0 and 1, got 1.5"),
        (dict(presence_threshold=-0.1), "presence_threshold must be between 0 and 1, got -0.1"),
        (dict(slice_batch=0), "slice_batch must be at least 1, got 0"),
        (dict(min_component_ml=-2), "min_component_ml must be at least 0, got -2"),
        (dict(mode="video"), "mode must be one of slices, track, clips, got 'video'"),
        (dict(axis=3), "axis must be one of 0, 1, 2, got 3"),
        (
            dict(modality="PET-CT"),
            "modality must be one of CT, MR, PT, US, XR, RGB, MICROSCOPY, OTHER, got 'PET-CT'",
        ),
        (dict(tta="yes"), "tta must be a bool, got 'yes'"),
        (dict(slice_batch=2.5), "slice_batch must be an int, got 2.5"),
        (dict(threshold=None), "threshold needs a value"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(changes, message):
    with pytest.raises(OptionError) as err:
        VolumeOptions(**changes)
    assert str(err.value) == message


def test_values_are_normalised():
    o = VolumeOptions(modality="mr", threshold=0, axis="auto", slice_batch="3")
    assert o.modality == "MR" and isinstance(o.threshold, float) and o.axis is None and o.slice_batch == 3
    assert VolumeOptions(axis="2").axis == 2


def test_replace_and_build_refuse_unknown_names():
    o = SegmentOptions()
    assert o.replace(tta=True).tta and not o.tta  # frozen: a new value
    with pytest.raises(OptionError, match="unknown option 'mirror'"):
        o.replace(mirror=True)
    with pytest.raises(OptionError, match="unknown option 'mode'"):
        build_options(SegmentOptions, None, mode="track")  # a volume option on 2D options
    merged = build_options(VolumeOptions, SegmentOptions(threshold=0.3), min_slices=2)
    assert (merged.threshold, merged.min_slices) == (0.3, 2)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(tta=True, instances=True),
            "tta (test-time mirroring) keeps one mask per text or box prompt and cannot "
            "be combined with instances",
        ),
        (dict(tta=True, mode="track"), "cannot be combined with mode track"),
        (dict(image_size=672, mode="track"), "image_size cannot be combined with mode track"),
    ],
)
def test_rules_on_the_options_alone_refuse_their_construction(changes, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        VolumeOptions(**changes)


@pytest.mark.parametrize(
    "changes, points, volume, message",
    [
        (dict(tta=True), True, False, "cannot be combined with point prompts"),
        (dict(instances=True), False, True, "instances is for 2D images: a volume gets one label per prompt"),
    ],
)
def test_rules_on_the_request(changes, points, volume, message):
    options = VolumeOptions(**changes)
    check_request(options)  # fine without points / on a 2D image
    with pytest.raises(OptionError, match=message):
        check_request(options, points=points, volume=volume)


def test_every_rule_has_one_message_and_refuses_only_its_case():
    assert len({r.message for r in RULES}) == len(RULES)
    plain = VolumeOptions()
    for rule in RULES:
        assert not rule.applies(plain, False, False)
    assert isinstance(OptionError("x"), PromptError)  # front ends treat it as a bad request


# -- the front ends are made from the declarations ---------------------------------------------------------
def _parser(front: str) -> argparse.ArgumentParser:
    from medsam3.commands.inference_options import add_option_arguments

    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    add_option_arguments(parser, front)
    return parser


@pytest.mark.parametrize("front", ["segment", "evaluate", "serve"])
def test_cli_options_follow_the_declarations(front):
    from medsam3.commands.inference_options import flag_of, options_from_args

    parser = _parser(front)
    args = parser.parse_args([])
    declared = option_fields(VolumeOptions, front)
    assert declared
    for f, _ in declared:
        assert getattr(args, f.name) == default_of(f.name, front), f.name
        assert flag_of(f.name) in parser.format_help()
    if front == "evaluate":
        assert options_from_args(args, front).presence_threshold == 0.0


def test_cli_values_are_checked_with_the_same_message():
    parser = _parser("segment")
    with pytest.raises(argparse.ArgumentError, match="threshold must be between 0 and 1, got 1.5"):
        parser.parse_args(["--threshold", "1.5"])
    args = parser.parse_args(["--axis", "auto", "--slice-batch", "2", "--no-fill-holes", "--modality", "ct"])
    assert (args.axis, args.slice_batch, args.fill_holes, args.modality) == (None, 2, False, "CT")


def test_api_fields_follow_the_declarations():
    from medsam3.serve.schemas import API_OPTIONS, SegmentIn

    assert set(API_OPTIONS) == {f.name for f, _ in option_fields(VolumeOptions, "api")}
    assert set(API_OPTIONS) <= set(SegmentIn.model_fields)
    schema = SegmentIn.model_json_schema()["properties"]
    assert schema["threshold"]["maximum"] == 1.0 and schema["min_slices"]["minimum"] == 1
    body = SegmentIn.model_validate({"prompts": [{"text": "x"}], "min_slices": 3})
    options = body.options({"threshold": 0.25})
    assert (options.threshold, options.min_slices, options.presence_threshold) == (0.25, 3, 0.5)


# -- the same message from the CLI, the API and Python --------------------------------------------------
INVALID = [
    ({"tta": True, "instances": True}, ["--tta", "--instances"], []),
    ({"tta": True}, ["--tta"], [(100.0, 80.0)]),
    ({"threshold": 2.0}, ["--threshold", "2"], []),
]


def _python_message(loaded, options, points) -> str:
    from medsam3.image import Image
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter

    image = Image.from_array(np.zeros((40, 60), np.uint8), modality="US")
    prompt = Prompt("polyp", points=points or None)
    with pytest.raises(OptionError) as err:
        Segmenter(loaded, **options).segment(image, [prompt])
    return str(err.value)


def _cli_message(capsys, tmp_path, model, flags, points) -> str:
    from PIL import Image as PILImage

    from medsam3.cli import main

    path = tmp_path / "in.png"
    PILImage.fromarray(np.zeros((40, 60), np.uint8)).save(path)
    argv = [
        "segment",
        str(path),
        "-p",
        "polyp",
        *[a for p in points for a in ("--point", f"{p[0]},{p[1]}")],
        *flags,
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(model),
    ]
    code = main(argv)
    assert code == 2 and not (tmp_path / "out").exists()
    line = [x for x in capsys.readouterr().err.splitlines() if "error: " in x][-1]
    message = line.split("error: ", 1)[1]
    return (
        message.split(": ", 1)[1] if message.startswith("argument ") else message
    )  # argparse names the flag


def _api_message(serve_model, tmp_path, options, points) -> str:
    from PIL import Image as PILImage

    from serve_fixtures import client_for, make_settings, upload

    path = tmp_path / "api.png"
    PILImage.fromarray(np.zeros((40, 60), np.uint8)).save(path)
    with client_for(make_settings(serve_model, tmp_path / "work")) as client:
        image_id = upload(client, path).json()["image_id"]
        prompt = {"text": "polyp"} | ({"points": [list(p) for p in points]} if points else {})
        r = client.post(f"/api/images/{image_id}/segment", json={"prompts": [prompt], **options})
    assert r.status_code == 422, r.text
    return r.json()["error"]


@pytest.mark.parametrize("options, flags, points", INVALID)
def test_same_message_from_cli_api_and_python(options, flags, points, serve_model, tmp_path, capsys):
    from medsam3.model.loading import load_sam3

    loaded = load_sam3(serve_model, device="cpu", dtype="fp32")
    python = _python_message(loaded, options, points)
    cli = _cli_message(capsys, tmp_path, serve_model, flags, points)
    api = _api_message(serve_model, tmp_path, options, points)
    assert python == cli == api, (python, cli, api)

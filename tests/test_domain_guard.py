"""The domain guard: a known concept on an image unlike its training images is reported absent.

Three levels: distances, thresholds and the file by hand (unit vectors whose cosines are known); the tiny
random model of the serve tests given a ``concepts.json`` and a ``domain.safetensors`` whose thresholds put
one concept always outside and one never (2D, a volume, instances, geometry prompts, the override, compared
with the same model run without guards); and the bundled ``medsam3-nano`` on real images (a CT slice of a
held-out item is outside "fetal head" and "polyp"; the bundled ultrasound and MRI samples are inside) at
the command line, in Python and through the server. The viewer's chip is in
``test_serve_browser_vocabulary.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import medsam3
from medsam3.errors import ModelError
from medsam3.io.memory import to_image
from medsam3.model.concepts import ModelConcepts
from medsam3.model.domain import (
    DOMAIN_FILE,
    OUTSIDE_DOMAIN,
    ConceptDomain,
    ModelDomain,
    fit_concept,
    nearest_distances,
)
from medsam3.model.resolve import BUNDLED_MODEL_DIR
from medsam3.predict.domain_fit import case_descriptors
from medsam3.predict.prompts import Prompt
from test_vocabulary_guard import TINY, _remapped
from test_vocabulary_guard_e2e import segment_cli

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"
#: A held-out CT slice of the out-of-domain benchmark (configs/nano_ood_heldout.json), never trained on.
CT_SLICE = "sam_med2d_demo/images/s0619_32.png"


# --------------------------------------------------------------------------------------------------
# by hand


def test_nearest_distances_and_the_median_by_hand():
    reference = np.array([[1.0, 0.0]], dtype=np.float32)
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(nearest_distances(rows, reference), [0.0, 1.0, 0.2], atol=1e-6)
    dom = ConceptDomain(reference, np.zeros(1, dtype=np.int32), 0.1)
    assert dom.distance(rows) == pytest.approx(0.2, abs=1e-6)  # median of 0, 1, 0.2
    assert dom.distance(rows * 5) == pytest.approx(0.2, abs=1e-6)  # rows are normalised first
    assert dom.outside(rows) and not dom.outside(rows[:1])


def test_threshold_rule_by_hand():
    a, b, c = [np.array([v], dtype=np.float32) for v in ([1.0, 0.0], [0.8, 0.6], [0.6, 0.8])]
    # leave one case out: a -> 1 - 0.8 = 0.2, b -> 1 - 0.96 = 0.04, c -> 0.04: spread 0.2
    alone = fit_concept([a, b, c])
    assert alone.threshold == pytest.approx(0.2, abs=1e-6) and alone.nearest_negative is None
    # a negative no farther than the spread changes nothing ([0, 1]: 1 - 0.8 = 0.2)
    near = fit_concept([a, b, c], [np.array([[0.0, 1.0]], dtype=np.float32)])
    assert near.threshold == pytest.approx(0.2, abs=1e-6)
    assert near.nearest_negative == pytest.approx(0.2, abs=1e-6)
    # a far negative ([-1, 0]: 1 - (-0.6) = 1.6): the geometric mean sqrt(0.2 * 1.6)
    far = fit_concept([a, b, c], [np.array([[-1.0, 0.0]], dtype=np.float32)])
    assert far.threshold == pytest.approx(np.sqrt(0.32), abs=1e-6) and far.spread == pytest.approx(0.2)
    np.testing.assert_array_equal(far.cases, [0, 1, 2])
    with pytest.raises(ModelError, match="at least 2 cases"):
        fit_concept([a])


def test_file_round_trip_shares_rows_and_names_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(3, 8)).astype(np.float32) for _ in range(3)]
    region = fit_concept(rows, [rng.normal(size=(2, 8)).astype(np.float32)])
    other = fit_concept([rng.normal(size=(1, 8)).astype(np.float32) for _ in range(2)])
    domain = ModelDomain({"region": region, "part": region, "other": other}, info={"by": "test"})
    path = domain.write(tmp_path)
    assert path.name == DOMAIN_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        assert fh.get_tensor("features").shape == (9 + 2, 8)  # "region" and "part" share their rows
    back = ModelDomain.load(path)
    assert sorted(back.concepts) == ["other", "part", "region"] and back.info == {"by": "test"}
    for name, dom in domain.concepts.items():
        got = back.concepts[name]
        np.testing.assert_allclose(got.features, dom.features, atol=2e-3)  # float16 in the file
        np.testing.assert_array_equal(got.cases, dom.cases)
        assert got.threshold == dom.threshold and got.spread == dom.spread
        assert got.nearest_negative == dom.nearest_negative
    assert ModelDomain.of_model(tmp_path) is not None and ModelDomain.of_model(tmp_path / "none") is None

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / DOMAIN_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=f"{DOMAIN_FILE}: cannot read the model's training domain"):
        ModelDomain.load(bad / DOMAIN_FILE)


# --------------------------------------------------------------------------------------------------
# the tiny random model: "polyp" always outside (threshold -1), "fetal head" never (threshold 3)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(3)
    return to_image(rng.integers(0, 255, size=(60, 80), dtype=np.uint8))


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(5)
    return to_image(rng.normal(100, 30, size=(6, 40, 48)).astype(np.float32), spacing=(0.8, 0.8, 2.0))


@pytest.fixture(scope="module")
def domain_model(serve_model, picture, tmp_path_factory):
    """A copy of the tiny model folder with two concepts and a domain that refuses "polyp" everywhere."""
    from medsam3.predict.segmenter import Segmenter

    folder = tmp_path_factory.mktemp("domain") / "model"
    shutil.copytree(serve_model, folder)
    ModelConcepts(TINY).write(folder)
    rows = case_descriptors(
        Segmenter(str(folder), device="cpu", dtype="fp32", concepts=None), picture, "polyp"
    )
    cases = np.zeros(len(rows), dtype=np.int32)
    ModelDomain(
        {"fetal head": ConceptDomain(rows, cases, 3.0), "polyp": ConceptDomain(rows, cases, -1.0)}
    ).write(folder)
    return folder


def _seg(folder, **options):
    from medsam3.predict.segmenter import Segmenter

    return Segmenter(
        str(folder), device="cpu", dtype="fp32", threshold=0.0, presence_threshold=0.5, **options
    )


def test_outside_concepts_are_absent_and_the_rest_as_without_them(domain_model, serve_model, picture):
    seg = _seg(domain_model)
    assert seg.domain is not None and sorted(seg.domain.concepts) == ["fetal head", "polyp"]
    got = seg.segment(picture, ["liver", "foetal head", "polyp"])
    ref = _seg(serve_model).segment(picture, ["fetal head"])
    assert np.array_equal(got.label_map, _remapped(ref.label_map, {1: 2}))
    states = [(e.value, e.absent, e.reason, e.source) for e in got.labels]
    assert states == [
        (1, True, "unknown concept", "vocabulary"),
        (2, False, None, "detector"),
        (3, True, OUTSIDE_DOMAIN, "training domain"),
    ]
    polyp = got.labels[2].to_dict()
    assert polyp["domain_threshold"] == -1.0 and polyp["domain_distance"] >= 0 and polyp["area_px"] == 0
    checks = got.settings["domain"]["prompts"]
    assert [(c["prompt_index"], c["concept"], c["outside"]) for c in checks] == [
        (1, "fetal head", False),
        (2, "polyp", True),
    ]
    # the distance of the image to its own rows is 0
    assert checks[0]["distance"] == pytest.approx(0.0, abs=1e-3)


def test_allow_out_of_domain_segments_them(domain_model, serve_model, picture):
    got = _seg(domain_model).segment(picture, ["foetal head", "polyp"], allow_out_of_domain=True)
    ref = _seg(serve_model).segment(picture, ["fetal head", "polyp"])
    assert np.array_equal(got.label_map, ref.label_map)
    assert [e.reason for e in got.labels] == [e.reason for e in ref.labels]
    assert got.settings["domain"]["images_outside"].startswith("segmented anyway")
    assert got.settings["domain"]["prompts"][1]["outside"]  # still reported


def test_geometry_prompts_are_not_judged(domain_model, serve_model, picture):
    box = Prompt("polyp", boxes=[(10, 10, 50, 40)])
    got = _seg(domain_model).segment(picture, [box])
    ref = _seg(serve_model).segment(picture, [box])
    assert np.array_equal(got.label_map, ref.label_map) and got.settings["domain"]["prompts"] == []


def test_only_outside_prompts_give_an_empty_result(domain_model, picture, tmp_path):
    got = _seg(domain_model).segment(picture, ["polyp"])
    assert not got.label_map.any() and got.labels[0].reason == OUTSIDE_DOMAIN
    got.write(tmp_path, "pic")  # writers cope with it


def test_instances(domain_model, serve_model, picture):
    got = _seg(domain_model, instances=True).segment(picture, ["polyp", "fetal head"])
    ref = _seg(serve_model, instances=True).segment(picture, ["fetal head"])
    assert np.array_equal(got.label_map, ref.label_map)
    assert [(e.prompt_index, e.value) for e in got.labels if e.reason == OUTSIDE_DOMAIN] == [(0, None)]


def test_volume_slices(domain_model, serve_model, volume):
    got = _seg(domain_model).segment(volume, ["fetal head", "polyp"], modality="MR")
    ref = _seg(serve_model).segment(volume, ["fetal head"], modality="MR")
    assert np.array_equal(got.label_map, ref.label_map)
    polyp = got.labels[1]
    assert polyp.reason == OUTSIDE_DOMAIN and polyp.voxels == 0 and polyp.value == 2


# --------------------------------------------------------------------------------------------------
# the bundled model on real images


def test_the_bundled_model_records_its_training_domain():
    domain = ModelDomain.of_model(BUNDLED_MODEL_DIR)
    assert domain is not None
    assert sorted(domain.concepts) == sorted(ModelConcepts.of_model(BUNDLED_MODEL_DIR).names)
    for name, dom in domain.concepts.items():
        assert 0 < dom.spread <= dom.threshold < 1, name
        assert dom.nearest_negative is not None, name
    assert domain.info["fitted_on"]["fetal head"] == {"cases": 17, "negatives": 7}


def test_cli_ct_slice_is_outside_and_the_samples_inside(data_dir, tmp_path):
    ct = data_dir / CT_SLICE
    code, out = segment_cli(ct, "-p", "fetal head", "-p", "polyp", "-o", tmp_path / "ct")
    assert code == 0 and "absent (outside the training domain)" in out
    line = next(row for row in out.splitlines() if row.startswith(OUTSIDE_DOMAIN))
    assert "'fetal head', 'polyp'" in line and "--allow-out-of-domain" in line
    summary = json.loads((tmp_path / "ct" / "s0619_32.json").read_text())
    for e in summary["labels"]:
        assert e["absent"] and e["reason"] == OUTSIDE_DOMAIN and e["area_px"] == 0
        assert e["domain_distance"] > e["domain_threshold"] > 0
    assert summary["settings"]["domain"]["file"] == DOMAIN_FILE

    code, out = segment_cli(ct, "-p", "fetal head", "--allow-out-of-domain", "-o", tmp_path / "allowed")
    allowed = json.loads((tmp_path / "allowed" / "s0619_32.json").read_text())
    assert code == 0 and OUTSIDE_DOMAIN not in out
    assert allowed["labels"][0]["source"] == "detector"  # the network's own answer

    for sample, prompt in (
        (SAMPLES / "hc18_400_HC.png", "fetal head"),
        (SAMPLES / "hippocampus_019.nii.gz", "hippocampus"),
    ):
        code, out = segment_cli(sample, "-p", prompt, "-o", tmp_path / "in")
        assert code == 0 and OUTSIDE_DOMAIN not in out, sample


def test_python_api_on_a_ct_slice(data_dir):
    result = medsam3.segment(data_dir / CT_SLICE, ["fetal head", "hippocampus"], device="cpu")
    assert [e.reason for e in result.labels] == [OUTSIDE_DOMAIN, OUTSIDE_DOMAIN]
    assert not result.label_map.any()


def test_server_reports_and_overrides(data_dir, tmp_path):
    from serve_fixtures import client_for, make_settings, segment, upload

    with client_for(make_settings(BUNDLED_MODEL_DIR, tmp_path / "srv", threshold=0.1)) as client:
        image_id = upload(client, data_dir / CT_SLICE).json()["image_id"]
        job = segment(client, image_id, {"prompts": [{"text": "fetal head"}]})
        assert job["status"] == "done", job
        (head,) = job["result"]["labels"]
        assert head["absent"] and head["reason"] == OUTSIDE_DOMAIN and head["domain_distance"] > 0
        allowed = segment(
            client, image_id, {"prompts": [{"text": "fetal head"}], "allow_out_of_domain": True}
        )
        assert allowed["status"] == "done" and allowed["result"]["labels"][0]["reason"] != OUTSIDE_DOMAIN

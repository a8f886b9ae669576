"""Per-dataset 85/15 splits: counts, seed 42, order independence, stability when cases are added."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from medsam3.data.splits import n_val_for, read_splits, split_dataset, write_splits


@pytest.mark.parametrize(("n", "n_val"), [(1, 0), (2, 1), (4, 1), (18, 3), (20, 3), (100, 15), (647, 98)])
def test_validation_counts(n, n_val):
    # ceil(n * 0.15) as scikit-learn's train_test_split; a single case stays in train
    assert n_val_for(n) == n_val
    split = split_dataset([f"c{i:04d}" for i in range(n)])
    assert sum(s == "val" for s in split.values()) == n_val
    assert sum(s == "train" for s in split.values()) == n - n_val


def test_seed_42_rule_and_order_independence():
    ids = [f"case_{i:02d}" for i in range(20)]
    perm = np.random.default_rng(42).permutation(20)
    expected_val = {ids[i] for i in perm[: math.ceil(20 * 0.15)]}
    shuffled = ids[:]
    random.Random(7).shuffle(shuffled)
    a = split_dataset(ids)
    b = split_dataset(shuffled + ids[:5])  # other order, duplicates
    assert a == b
    assert {c for c, s in a.items() if s == "val"} == expected_val
    assert split_dataset(ids, seed=43) != a


def test_existing_splits_respected_and_new_cases_appended():
    ids = [f"c{i:02d}" for i in range(20)]
    first = split_dataset(ids)
    new = [f"n{i:02d}" for i in range(10)]
    second = split_dataset(ids + new, existing=first)
    assert {c: second[c] for c in ids} == first
    n_val = sum(s == "val" for s in second.values())
    assert n_val == math.ceil(30 * 0.15)
    # the newcomers' assignment follows the same rule on the new ids alone
    perm = np.random.default_rng(42).permutation(10)
    k = math.ceil(30 * 0.15) - sum(s == "val" for s in first.values())
    assert {c for c in new if second[c] == "val"} == {new[i] for i in perm[:k]}
    # the same again gives the same result
    assert split_dataset(ids + new, existing=first) == second


def test_external_role_puts_everything_in_test():
    assert set(split_dataset(["a", "b", "c"], role="external").values()) == {"test"}


def test_splits_file_round_trip(tmp_path):
    splits = {"B": split_dataset(["x", "y", "z"]), "A": split_dataset(["p", "q"], role="external")}
    path = write_splits(tmp_path / "s.json", splits)
    assert read_splits(path) == splits
    assert read_splits(tmp_path / "missing.json") == {}

"""Partition properties: coverage, counts, determinism, skew, termination, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedftg.data.partition import (
    SCHEMES,
    format_partition_table,
    make_partition,
    partition_stats,
)
from fedftg.errors import UserError
from fedftg.report.heatmap import save_partition_heatmap

LABELS = np.random.default_rng(0).integers(0, 10, size=6000)


def _check_valid(part, labels, num_classes=10, exact=True):
    flat = np.concatenate(part.client_indices)
    assert len(np.unique(flat)) == len(flat), "a sample was assigned twice"
    if exact:
        assert sorted(flat.tolist()) == list(range(len(labels)))
    recount = np.stack(
        [np.bincount(labels[ix], minlength=num_classes) for ix in part.client_indices]
    )
    np.testing.assert_array_equal(recount, part.counts)


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_every_sample_once_and_counts_match(scheme):
    part = make_partition(LABELS, 10, 20, scheme, alpha=0.3, min_size=5, seed=1)
    _check_valid(part, LABELS)
    assert part.num_clients == 20


@pytest.mark.parametrize("scheme", SCHEMES.names())
def test_same_seed_same_split_other_seed_other_split(scheme):
    a = make_partition(LABELS, 10, 20, scheme, alpha=0.3, min_size=5, seed=1)
    b = make_partition(LABELS, 10, 20, scheme, alpha=0.3, min_size=5, seed=1)
    c = make_partition(LABELS, 10, 20, scheme, alpha=0.3, min_size=5, seed=2)
    assert all(
        np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices, strict=True)
    )
    assert not all(
        np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices, strict=True)
    )


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet-label"])
def test_large_alpha_is_close_to_iid_and_small_alpha_is_skewed(scheme):
    iid_like = partition_stats(make_partition(LABELS, 10, 10, scheme, alpha=1000, seed=0))
    skewed = partition_stats(make_partition(LABELS, 10, 10, scheme, alpha=0.05, min_size=1, seed=0))
    assert iid_like["mean_tv"] < 0.1
    assert skewed["mean_tv"] > 0.5
    assert skewed["classes_per_client_mean"] < iid_like["classes_per_client_mean"]


def test_tiny_alpha_many_clients_terminates():
    labels = np.random.default_rng(1).integers(0, 10, size=60000)
    part = make_partition(labels, 10, 100, "dirichlet", alpha=0.01, seed=0)
    _check_valid(part, labels)
    part = make_partition(labels, 10, 100, "dirichlet", alpha=0.01, samples_per_client=500, seed=0)
    _check_valid(part, labels, exact=False)
    assert (part.sizes == 500).all()


def test_dirichlet_balanced_sizes_and_lognormal_skew():
    bal = make_partition(LABELS, 10, 12, "dirichlet", alpha=0.5, seed=0)
    assert bal.sizes.max() - bal.sizes.min() <= 1
    skew = make_partition(LABELS, 10, 12, "dirichlet", alpha=0.5, sigma=1.5, seed=0)
    assert skew.sizes.sum() == len(LABELS) and skew.sizes.min() >= 1
    assert skew.sizes.max() > 2 * skew.sizes.min()


def test_authors_style_quota_of_500_per_client():
    part = make_partition(LABELS, 10, 10, "dirichlet", alpha=0.3, samples_per_client=500, seed=0)
    assert (part.sizes == 500).all()
    _check_valid(part, LABELS, exact=False)


def test_shards_limit_classes_per_client():
    part = make_partition(np.sort(LABELS), 10, 20, "shards", shards_per_client=2, seed=0)
    assert ((part.counts > 0).sum(axis=1) <= 3).all()  # a shard may straddle two labels
    assert (part.counts > 0).sum(axis=1).mean() < 3


def test_dirichlet_label_min_size_and_impossible_min_size():
    part = make_partition(LABELS, 10, 20, "dirichlet-label", alpha=0.1, min_size=50, seed=0)
    assert part.sizes.min() >= 50
    with pytest.raises(UserError, match="min_size"):
        make_partition(LABELS, 10, 20, "dirichlet-label", alpha=0.1, min_size=400, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "bogus"}, "partition"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_clients": 0}, "clients"),
        ({"num_clients": 7000}, "clients"),
        ({"sigma": -1.0}, "sigma"),
        ({"shards_per_client": 0}, "shards_per_client"),
        ({"samples_per_client": 1000}, "samples_per_client"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    args = {"num_clients": 10, "scheme": "dirichlet", "alpha": 0.5} | kwargs
    with pytest.raises(UserError, match=field):
        make_partition(LABELS, 10, args.pop("num_clients"), args.pop("scheme"), **args)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 30),
    alpha=st.floats(0.01, 100),
    seed=st.integers(0, 10_000),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    n=st.integers(60, 400),
)
def test_invariants_property(k, alpha, seed, scheme, n):
    labels = np.random.default_rng(seed).integers(0, 5, size=n)
    part = make_partition(labels, 5, k, scheme, alpha=alpha, seed=seed)
    _check_valid(part, labels, num_classes=5)


def test_stats_table_and_heatmap(tmp_path):
    part = make_partition(LABELS, 10, 8, "dirichlet", alpha=0.1, seed=0)
    table = format_partition_table(part)
    assert len(table.splitlines()) == 9
    png = tmp_path / "h.png"
    save_partition_heatmap(part.counts, png, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]

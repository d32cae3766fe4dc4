"""Flower Datasets partitioners as partition schemes (`fedftg.data.flwr_partition`).

The tests that split need the extra ``fedftg[flwr-datasets]`` and skip without it; the
settings' parsing, validation and fingerprint, and the message when the extra is missing,
are tested either way.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from clirun import run_cli
from fedftg.config import (
    RunConfig,
    apply_overrides,
    build_config,
    fingerprint,
    load_config_file,
)
from fedftg.data.flwr_partition import parse_args
from fedftg.data.partition import (
    SCHEMES,
    format_partition_table,
    partition_label,
    partition_labels,
    partition_stats,
    scheme_settings,
)
from fedftg.errors import UserError

TINY = ["--rounds", "2", "--clients", "3", "--local-steps", "2", "--participation", "1"]
LABELS = np.random.default_rng(0).integers(0, 10, size=600)


@pytest.fixture(autouse=True)
def _own_schemes(monkeypatch):
    """Schemes registered by a test (flwr:<Class> on first use, python:...) end with it."""
    monkeypatch.setattr(SCHEMES, "_entries", SCHEMES.entries())


@pytest.fixture
def flwr():
    """``flwr_datasets.partitioner``, or the test is skipped (the extra is absent)."""
    pytest.importorskip("flwr_datasets")
    import flwr_datasets.partitioner as module

    return module


def split(
    scheme: str,
    args: dict | None = None,
    *,
    seed: int = 0,
    clients: int = 6,
    each: int | None = None,
):
    """The partition of LABELS by ``scheme`` with partitioner arguments ``args`` (``each``:
    the samples per client dealt, None: all)."""
    settings = scheme_settings(scheme, {"partition_args": args or {}, "samples_per_client": each})
    return partition_labels(LABELS, 10, clients, scheme, settings, seed=seed)


def same(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices, strict=True)
    )


# ------------------------------------------------------------------ settings, no extra


def test_partition_args_parse_as_numbers_bools_and_strings():
    assert parse_args("x", "alpha=0.3, partition_by=label,n=4,shuffle=false") == {
        "alpha": 0.3,
        "partition_by": "label",
        "n": 4,
        "shuffle": False,
    }
    assert parse_args("x", "") == {}


def test_partition_args_from_a_flag_string_and_a_toml_table_are_the_same(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'partition = "flwr:DirichletPartitioner"\n[partition_args]\nalpha = 0.3\n'
        'partition_by = "label"\n'
    )
    flag = apply_overrides(RunConfig(), {"partition_args": "alpha=0.3,partition_by=label"})
    assert flag.partition_args == {"alpha": 0.3, "partition_by": "label"}
    table = apply_overrides(RunConfig(), load_config_file(toml))
    assert table.partition_args == flag.partition_args
    assert table.partition == "flwr:DirichletPartitioner"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("alpha", "partition_args: expected key=value pairs"),
        ("alpha=1,alpha=2", "partition_args: 'alpha' given twice"),
        ("2x=1", "partition_args: expected key=value pairs"),
    ],
)
def test_malformed_partition_args_are_one_error_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, ["run", "--partition-args", args, "--out", str(out)])
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_a_toml_table_of_other_values_is_refused():
    with pytest.raises(UserError, match="^partition_args: 'a'"):
        RunConfig().override({"partition_args": {"a": {"b": 1}}})


def test_partition_args_with_a_builtin_scheme_is_refused():
    with pytest.raises(UserError, match="^partition_args: the dirichlet scheme takes none"):
        RunConfig().override({"partition_args": "alpha=0.3"})


def test_the_new_setting_keeps_older_runs_fingerprints():
    now = RunConfig().validate().to_dict()
    older = {k: v for k, v in now.items() if k != "partition_args"}  # written before it
    assert fingerprint(older) == fingerprint(now)
    # the hash a checkpoint written before the setting holds: without it
    assert fingerprint(now) == fingerprint(now, ignore=("partition_args",))
    other = {**now, "partition": "flwr:IidPartitioner", "partition_args": {"a": 1}}
    assert fingerprint(other) != fingerprint({**other, "partition_args": {"a": 2}})


def test_without_the_extra_a_flwr_scheme_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "flwr_datasets.partitioner", None)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, ["run", "--partition", "flwr:IidPartitioner", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: partition: Flower Datasets partitioners need the extra")
    assert "fedftg[flwr-datasets]" in err and not out.exists()


def test_the_partition_label_of_titles():
    assert partition_label({"partition": "dirichlet", "alpha": 0.1}) == "dirichlet alpha=0.1"
    flwr = {"partition": "flwr:X", "alpha": 0.1, "partition_args": {"alpha": 0.3, "k": 2}}
    assert partition_label(flwr) == "flwr:X(alpha=0.3,k=2)"


# ------------------------------------------------------------------ with the extra


def test_a_flwr_scheme_covers_each_sample_once_and_counts_match(flwr):
    for scheme, args in [
        ("flwr:DirichletPartitioner", {"alpha": 0.3}),
        ("flwr:IidPartitioner", {}),
    ]:
        part = split(scheme, args)
        flat = np.concatenate(part.client_indices)
        assert sorted(flat.tolist()) == list(range(len(LABELS)))
        recount = [np.bincount(LABELS[ix], minlength=10) for ix in part.client_indices]
        np.testing.assert_array_equal(np.stack(recount), part.counts)


@pytest.mark.parametrize(
    ("scheme", "args"),
    [
        ("flwr:DirichletPartitioner", {"alpha": 0.3, "min_partition_size": 5}),
        ("flwr:IidPartitioner", {}),
    ],
)
def test_same_seed_same_partition_other_seed_other(flwr, scheme, args):
    assert same(split(scheme, args, seed=1), split(scheme, args, seed=1))
    assert not same(split(scheme, args, seed=1), split(scheme, args, seed=2))


def test_it_is_flower_s_split_of_the_shuffled_rows(flwr):
    """The partition is what the partitioner itself gives on the rows as shuffled."""
    from fedftg.data.flwr_partition import label_rows
    from fedftg.seeding import numpy_rng

    rng = numpy_rng(3, "partition", "flwr:DirichletPartitioner")
    seed = int(rng.integers(2**32))
    order = rng.permutation(len(LABELS))
    own = flwr.DirichletPartitioner(6, "label", alpha=0.3, seed=seed)
    own.dataset = label_rows(LABELS, order)
    want = [np.sort(own.load_partition(i)["index"]) for i in range(6)]
    got = split("flwr:DirichletPartitioner", {"alpha": 0.3}, seed=3).client_indices
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))


def test_samples_per_client_deals_that_many_rows_as_for_the_builtin_schemes(flwr):
    part = split("flwr:IidPartitioner", each=50)
    assert part.sizes.tolist() == [50] * 6
    assert len(np.unique(np.concatenate(part.client_indices))) == 300
    with pytest.raises(UserError, match="^samples_per_client: 200 x 6 clients exceeds"):
        split("flwr:IidPartitioner", each=200)


def test_stats_table_and_heatmap_work_for_it(flwr, tmp_path):
    from fedftg.report.heatmap import save_partition_heatmap

    part = split("flwr:DirichletPartitioner", {"alpha": 0.1})
    stats = partition_stats(part)
    assert stats["clients"] == 6 and stats["samples"] == len(LABELS) and stats["mean_tv"] > 0.3
    assert len(format_partition_table(part).splitlines()) == 7
    png = tmp_path / "h.png"
    save_partition_heatmap(part.counts, png, [str(c) for c in range(10)], "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _run(capsys, out: Path, *args: str) -> tuple[int, str]:
    code, _, err = run_cli(capsys, ["run", *TINY, "--quiet", "--out", str(out), *args])
    return code, err


@pytest.mark.parametrize(
    "args",
    [
        [
            "--partition",
            "flwr:DirichletPartitioner",
            "--partition-args",
            "alpha=0.5,min_partition_size=5",
        ],
        ["--partition", "flwr:IidPartitioner"],
    ],
)
def test_a_run_records_the_scheme_and_resumes(flwr, tmp_path, capsys, args):
    out = tmp_path / "run"
    code, err = _run(capsys, out, "--method", "fedavg", *args)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["partition"] == args[1]
    assert config["partition_args"] == parse_args("x", args[3] if len(args) > 2 else "")
    cfg = build_config(None, {"partition": args[1], "partition_args": config["partition_args"]})
    want = split(args[1], cfg.partition_args, clients=3)  # another label set: only the sizes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["clients"] == want.num_clients
    assert (out / "partition.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "metrics.jsonl").read_text()
    code, err = _run(capsys, out, "--method", "fedavg", *args)  # finished: kept as it is
    assert code == 0, err
    assert (out / "metrics.jsonl").read_text() == rows
    code, err = _run(capsys, out, "--method", "fedavg", *args, "--seed", "1")
    assert code == 2 and "seed" in err  # another partition: not this run


def test_a_run_s_partition_is_the_scheme_s_on_its_data(flwr, tmp_path, capsys):
    from fedftg.config import config_from_dict
    from fedftg.data.sources import load_dataset
    from fedftg.engine.setup import split_clients

    out = tmp_path / "run"
    args = ["--partition", "flwr:DirichletPartitioner", "--partition-args", "alpha=0.3"]
    code, err = _run(capsys, out, "--method", "fedavg", "--rounds", "1", *args)
    assert code == 0, err
    cfg = config_from_dict(json.loads((out / "config.json").read_text()))
    part = split_clients(cfg, load_dataset("digits"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"] == partition_stats(part)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--partition", "flwr:Nope"],
            "partition: flwr_datasets.partitioner has no partitioner 'Nope'",
        ),
        (
            ["--partition", "flwr:IidPartitioner", "--partition-args", "alpha=1"],
            "partition_args: flwr:IidPartitioner takes no argument 'alpha'",
        ),
        (
            ["--partition", "flwr:DirichletPartitioner"],
            "partition_args: flwr:DirichletPartitioner needs alpha",
        ),
        (
            ["--partition", "flwr:IidPartitioner", "--partition-args", "num_partitions=3"],
            "partition_args: flwr:IidPartitioner: num_partitions is set by the run",
        ),
        (
            [
                "--partition",
                "flwr:DirichletPartitioner",
                "--partition-args",
                "alpha=0.3,min_partition_size=600",
            ],
            "partition: flwr:DirichletPartitioner: The max number of attempts",
        ),
        (
            ["--partition", "flwr:NaturalIdPartitioner"],
            "partition: flwr:NaturalIdPartitioner makes 10 partitions for 3 clients",
        ),
    ],
)
def test_bad_partitioner_input_is_one_error_line_and_writes_nothing(
    flwr, tmp_path, capsys, args, message
):
    out = tmp_path / "run"
    code, err = _run(capsys, out, *args)
    assert code == 2 and err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1 and not out.exists()


def test_a_registered_partitioner_object_is_a_scheme_for_the_process(flwr):
    from fedftg.data.flwr_partition import register_partitioner

    obj = flwr.DirichletPartitioner(6, "label", alpha=0.3, seed=7)
    name = register_partitioner(obj)
    assert re.fullmatch(r"python:DirichletPartitioner-[0-9a-f]{8}", name)
    assert name in SCHEMES
    a, b = split(name, seed=0), split(name, seed=0)  # a copy splits: the object serves again
    assert same(a, b) and not obj.is_dataset_assigned()
    assert not same(a, split(name, seed=1))  # the rows are shuffled by the run's seed
    with pytest.raises(UserError, match="makes 6 partitions for 4 clients"):
        split(name, clients=4)
    cfg = RunConfig().override({"partition": name})
    assert cfg.partition == name and cfg.partition_args == {}


def test_a_partitioner_object_that_is_used_or_not_one_is_refused(flwr):
    from fedftg.data.flwr_partition import label_rows, register_partitioner

    used = flwr.IidPartitioner(3)
    used.dataset = label_rows(LABELS, np.arange(len(LABELS)))
    with pytest.raises(UserError, match="already holds a dataset"):
        register_partitioner(used)
    with pytest.raises(UserError, match="is not a flwr_datasets.partitioner.Partitioner"):
        register_partitioner(object())


def test_a_partition_with_an_empty_client_is_refused(flwr):
    from fedftg.data.flwr_partition import register_partitioner

    class FirstEmpty(flwr.Partitioner):
        """Client 0 gets nothing, the others share the rows."""

        def load_partition(self, partition_id):
            rows = np.arange(len(self.dataset))
            return self.dataset.select([] if partition_id == 0 else rows[partition_id - 1 :: 2])

        @property
        def num_partitions(self):
            return 3

    name = register_partitioner(FirstEmpty())
    with pytest.raises(UserError, match=f"^partition: {name} gave client 0 no samples"):
        split(name, clients=3)


def test_a_flower_run_config_gives_the_arguments_as_a_string(flwr):
    from fedftg.flower.common import config_from_run_config

    cfg = config_from_run_config(
        {"partition": "flwr:DirichletPartitioner", "partition-args": "alpha=0.3"}
    )
    assert cfg.partition_args == {"alpha": 0.3}


def test_a_scheme_made_on_first_use_leaves_the_help_as_it_was(flwr):
    before = SCHEMES.help_text()
    assert before.endswith("flwr:<Partitioner> (Flower Datasets)")
    RunConfig().override({"partition": "flwr:IidPartitioner"})
    assert "flwr:IidPartitioner" in SCHEMES.names() and SCHEMES.help_text() == before


def test_a_registered_object_runs_in_process_and_records_its_name(flwr, tmp_path, capsys):
    from fedftg.data.flwr_partition import register_partitioner

    name = register_partitioner(flwr.PathologicalPartitioner(3, "label", 2, seed=5))
    out = tmp_path / "run"
    code, err = _run(capsys, out, "--method", "fedavg", "--rounds", "1", "--partition", name)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["partition"] == name and config["partition_args"] == {}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["classes_per_client_mean"] == 2
    with pytest.raises(UserError, match=f"^partition_args: the {name} scheme takes none"):
        RunConfig().override({"partition": name, "partition_args": "a=1"})


def test_equal_partitioner_objects_share_a_name_other_arguments_do_not(flwr):
    from fedftg.data.flwr_partition import register_partitioner

    def make(alpha):
        return register_partitioner(flwr.DirichletPartitioner(6, "label", alpha=alpha, seed=7))

    assert make(0.3) == make(0.3) != make(0.5)


def test_fedftg_run_takes_a_partitioner_object_and_resumes_with_an_equal_one(flwr, tmp_path):
    import fedftg

    out = str(tmp_path / "run")

    def run(alpha, rounds):
        obj = flwr.DirichletPartitioner(4, "label", alpha=alpha, seed=3)
        return fedftg.run(method="fedavg", clients=4, rounds=rounds, local_steps=2,
                          participation=1.0, partition=obj, out=out, resume=True)  # fmt: skip

    first = run(0.5, 1)
    assert first.config["partition"].startswith("python:DirichletPartitioner-")
    more = run(0.5, 2)  # an equal object, more rounds: the run directory continues
    assert [r["round"] for r in more.metrics] == [1, 2] and more.metrics[0] == first.metrics[0]
    with pytest.raises(UserError, match=r"holds a run with other settings \(partition"):
        run(0.9, 3)

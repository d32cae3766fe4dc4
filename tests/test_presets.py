"""Presets (the paper's protocols and their CPU twins), --print-config, FedProx's authors'
variant and FedFTG's nz following the data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from clirun import run_cli as _run
from fedftg.config import RunConfig, build_config, config_from_dict, fingerprint
from fedftg.engine.setup import client_method
from fedftg.fl.client import LocalContext, LocalSpec, detached_state, train_local
from fedftg.presets import available, load_preset, preset_runs
from test_methods import TinyNet
from test_vectorised import _data


def _by_method(name: str) -> dict[str, RunConfig]:
    return {m: cfg for _, cfg in preset_runs(load_preset(name), {}) for m in cfg.method}


PAPER_METHODS = {
    "fedavg": (0.3, None),
    "fedftg": (0.3, None),
    "fedprox+ftg": (0.3, None),
    "feddyn": (0.3, None),
    "feddyn+ftg": (0.3, None),
    "moon": (0.3, None),
    "moon+ftg": (0.3, None),
    "feddf": (0.3, None),
    "scaffold+ftg": (0.3, 50),
    "fedprox": (0.6, None),
    "scaffold": (0.6, 50),
}


@pytest.mark.parametrize(
    ("name", "dataset", "nz", "clients", "rounds"),
    [
        ("paper-cifar10", "cifar10", 100, 100, 1000),
        ("paper-cifar100", "cifar100", 256, 100, 1000),
        ("paper-cifar10-cpu", "cifar10", 100, 40, 12),
        ("paper-cifar100-cpu", "cifar100", 256, 40, 12),
        ("paper-cifar10-cpu-robust", "cifar10", 100, 40, 12),
    ],
)
def test_shipped_presets_resolve_to_the_authors_protocol(name, dataset, nz, clients, rounds):
    runs = _by_method(name)
    assert set(runs) == set(PAPER_METHODS)
    for method, (alpha, steps) in PAPER_METHODS.items():
        cfg = runs[method]
        assert (cfg.dataset, cfg.model, cfg.clients, cfg.rounds) == (
            dataset,
            "resnet18",
            clients,
            rounds,
        )
        assert (cfg.alpha, cfg.local_steps) == (alpha, steps), method
        assert (cfg.samples_per_client, cfg.partition, cfg.sigma) == (500, "dirichlet", 0.0)
        assert (cfg.selection, cfg.participation) == ("bernoulli", 0.1)
        assert (cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.lr_decay) == (5, 50, 0.1, 0.998)
        assert (cfg.weight_decay, cfg.momentum, cfg.clip) == (1e-3, 0.0, 10.0)
        assert (cfg.fedprox.mu, cfg.fedprox.variant) == (1e-4, "weight_decay")
        assert (cfg.feddyn.alpha, cfg.moon.mu, cfg.moon.tau) == (1e-2, 0.5, 5.0)
        assert cfg.scaffold.variate_lr == "initial"
        ftg = cfg.ftg
        assert (ftg.iterations, ftg.gen_steps, ftg.student_steps) == (10, 1, 5)
        assert (ftg.gen_lr, ftg.student_lr, ftg.nz, ftg.batch_size) == (0.01, 0.1, nz, 50)
        assert cfg.preset.startswith(name + "/") and cfg.out.startswith(f"runs/{name}/")
        assert cfg.seed == (0 if "-cpu" in name else 1024)
    assert available()[name]  # listed, with its description


def test_the_cpu_twin_differs_from_its_preset_only_in_scale():
    full, twin = _by_method("paper-cifar10"), _by_method("paper-cifar10-cpu")
    scale = {"clients", "rounds", "seed", "out", "preset"}
    for method in PAPER_METHODS:
        a, b = full[method].to_dict(), twin[method].to_dict()
        assert {k for k in a if a[k] != b[k]} == scale, method


def test_the_robust_twin_differs_from_the_twin_only_in_the_students_statistics():
    twin, robust = _by_method("paper-cifar10-cpu"), _by_method("paper-cifar10-cpu-robust")
    assert set(robust) == set(twin)
    for method in PAPER_METHODS:
        a, b = twin[method].to_dict(), robust[method].to_dict()
        assert {k for k in a if a[k] != b[k]} == {"ftg", "out", "preset"}, method
        assert {k for k in a["ftg"] if a["ftg"][k] != b["ftg"][k]} == {"bn_stats"}
        assert (a["ftg"]["bn_stats"], b["ftg"]["bn_stats"]) == ("generated", "pooled")
        assert a["df"]["bn_stats"] == "generated"  # FedDF stays the authors'


def test_flags_override_a_preset_and_method_picks_its_groups():
    runs = preset_runs(
        load_preset("paper-cifar10-cpu"),
        {"rounds": "3", "ftg": {"iterations": 4}, "method": "fedftg,scaffold"},
        "out/x",
    )
    assert [(g, c.method, c.rounds, c.ftg.iterations, c.out) for g, c in runs] == [
        ("a0.3", ["fedftg"], 3, 4, "out/x/a0.3"),
        ("a0.6-steps50", ["scaffold"], 3, 4, "out/x/a0.6-steps50"),
    ]


def test_print_config_runs_nothing_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    args = ["run", "--preset", "paper-cifar10-cpu", "--method", "fedavg,fedftg"]
    code, stdout, _ = _run(capsys, [*args, "--rounds", "2", "--out", str(out), "--print-config"])
    assert code == 0 and not out.exists() and not list(tmp_path.iterdir())
    shown = json.loads(stdout)
    assert shown["method"] == ["fedavg", "fedftg"] and shown["rounds"] == 2
    assert shown["preset"] == "paper-cifar10-cpu/a0.3" and shown["ftg"]["nz"] == 100
    # any config, not only presets
    code, stdout, _ = _run(
        capsys, ["run", "--method", "fedprox", "--prox-mu", "0.2", "--print-config"]
    )
    assert code == 0 and json.loads(stdout)["fedprox"]["mu"] == 0.2


def test_an_unknown_preset_lists_the_known_ones(capsys):
    code, _, err = _run(capsys, ["run", "--preset", "paper-mnist"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: preset")
    assert all(name in lines[0] for name in available())


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("rounds = = 2\n", "invalid TOML"),
        ("roundz = 2\n", "roundz"),
        ('[groups.g]\nalpha = -1\nmethod = ["fedavg"]\n', "alpha"),
        ('extends = "paper-mnist"\n', "paper-mnist"),
    ],
)
def test_a_broken_preset_file_is_a_config_error(tmp_path, capsys, text, field):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    code, _, err = _run(capsys, ["run", "--preset", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and err.startswith("error:") and field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_preset_run_records_its_name(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(
        'description = "tiny"\nclients = 4\nparticipation = 1.0\nrounds = 1\nlocal_epochs = 1\n'
        '[groups.one]\nmethod = ["fedavg"]\n[groups.two]\nalpha = 0.5\nmethod = ["fedprox"]\n'
    )
    code, _, _ = _run(
        capsys, ["run", "--preset", str(path), "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert code == 0
    one = json.loads((tmp_path / "r" / "one" / "config.json").read_text())
    two = json.loads((tmp_path / "r" / "two" / "config.json").read_text())
    assert (one["preset"], one["method"], one["alpha"]) == ("tiny/one", ["fedavg"], 0.1)
    assert (two["preset"], two["method"], two["alpha"]) == ("tiny/two", ["fedprox"], 0.5)


def test_nz_follows_the_data_unless_set():
    assert build_config(None, {"method": "fedftg"}).ftg.nz == 100
    assert build_config(None, {"method": "fedftg", "dataset": "cifar100"}).ftg.nz == 256
    assert build_config(None, {"method": "feddf", "dataset": "cifar100"}).df.nz == 256
    assert (
        build_config(None, {"method": "fedftg", "dataset": "cifar100", "ftg.nz": 64}).ftg.nz == 64
    )
    # a run from before (nz written as 100) has the fingerprint of today's default on 10 classes
    old = RunConfig(method=["fedftg"]).validate().to_dict()
    old["ftg"]["nz"] = 100
    new = RunConfig(method=["fedftg"]).validate().to_dict()
    assert new["ftg"]["nz"] is None and config_from_dict(new).ftg.nz == 100
    assert fingerprint(old) == fingerprint(new)


def test_fedprox_authors_variant_is_fedavg_with_mu_added_to_the_weight_decay():
    torch.manual_seed(0)
    model = TinyNet()
    init = detached_state(model)
    data = _data(40, 1, 4, 3)
    spec = LocalSpec(lr=0.1, epochs=2, batch_size=8, weight_decay=1e-3)

    def train(values: dict, weight_decay: float) -> torch.Tensor:
        base = values.pop("_base", "fedprox")
        method = client_method(RunConfig().override(values), base)
        ctx = LocalContext(init, {}, {})
        gen = torch.Generator().manual_seed(1)
        local = LocalSpec(**{**spec.__dict__, "weight_decay": weight_decay})
        return train_local(model, data, torch.arange(40), method, ctx, local, gen).state[
            "classifier.weight"
        ]

    authors = train({"fedprox.mu": 0.05, "fedprox.variant": "weight_decay"}, 1e-3)
    fedavg_more_decay = train({"_base": "fedavg"}, 1e-3 + 0.05)
    proximal = train({"fedprox.mu": 0.05}, 1e-3)
    torch.testing.assert_close(authors, fedavg_more_decay, rtol=0, atol=0)
    assert not torch.allclose(authors, proximal)


@pytest.mark.processes
def test_print_config_into_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedftg.cli", "run", "--preset", "paper-cifar10", "--print-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as `| head` does once it has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err

"""FedNova: the normalised average against a hand computation, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from fedftg.cli import main
from fedftg.fl.aggregation import weighted_average
from fedftg.fl.client import LocalResult
from fedftg.methods.fednova import FedNova, effective_steps, normalised_average


def _result(w: list[float], steps: int, n: int, count: int = 0) -> LocalResult:
    state = {"w": torch.tensor(w, dtype=torch.float64), "count": torch.tensor(count)}
    return LocalResult(state=state, num_samples=n, steps=steps, loss=0.0)


def test_unequal_local_steps_against_a_hand_computation():
    global_state = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64), "count": torch.tensor(3)}
    # client 1: 100 samples, 2 steps; client 2: 300 samples, 6 steps
    results = [_result([0.0, 2.0], 2, 100, count=5), _result([4.0, -1.0], 6, 300, count=9)]
    new = FedNova().aggregate(global_state, results, {}, num_clients=2)
    # p = (1/4, 3/4); d_1 = ([1, 0]) / 2, d_2 = ([-3, 3]) / 6; tau_eff = 2/4 + 18/4 = 5
    # sum p d = [1/8 - 3/8, 0 + 3/8] = [-1/4, 3/8]; w - 5 * that = [2.25, 0.125]
    torch.testing.assert_close(new["w"], torch.tensor([2.25, 0.125], dtype=torch.float64))
    assert int(new["count"]) == 9
    fedavg = weighted_average([r.state for r in results], [100, 300])["w"]
    assert not torch.allclose(new["w"], fedavg)  # FedAvg gives [3, -0.25]


def test_equal_steps_is_fedavg():
    global_state = {"w": torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)}
    states = [{"w": torch.randn(3, dtype=torch.float64)} for _ in range(3)]
    new = normalised_average(global_state, states, [10, 20, 30], [4.0, 4.0, 4.0])
    torch.testing.assert_close(new["w"], weighted_average(states, [10, 20, 30])["w"])


def test_effective_steps_with_momentum():
    assert effective_steps(5) == 5.0
    rho, tau = 0.9, 3
    # sum over the steps of the momentum geometric series: (1) + (1 + rho) + (1 + rho + rho^2)
    by_hand = 1 + (1 + rho) + (1 + rho + rho**2)
    assert effective_steps(tau, rho) == pytest.approx(by_hand)


def test_a_client_without_steps_adds_nothing():
    global_state = {"w": torch.tensor([1.0], dtype=torch.float64)}
    still = {"w": torch.tensor([1.0], dtype=torch.float64)}
    moved = {"w": torch.tensor([0.0], dtype=torch.float64)}
    new = normalised_average(global_state, [still, moved], [1, 1], [0.0, 2.0])
    # tau_eff = 1, sum p d = 0.5 * 1 / 2 = 0.25
    torch.testing.assert_close(new["w"], torch.tensor([0.75], dtype=torch.float64))


def test_fednova_runs_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "nova"
    args = ["run", "--rounds", "2", "--clients", "4", "--participation", "1", "--quiet"]
    args += ["--sigma", "1.0"]  # unequal client sizes, so unequal local steps
    assert (
        main([*args, "--method", "fedavg,fednova", "--local-epochs", "1", "--out", str(out)]) == 0
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    nova = [r for r in records if r["method"] == "fednova"]
    avg = [r for r in records if r["method"] == "fedavg"]
    assert len(nova) == 2 and all(0 <= r["test_acc"] <= 1 for r in nova)
    # the clients hold different amounts of data, so their step counts differ
    assert [r["test_acc"] for r in nova] != [r["test_acc"] for r in avg]

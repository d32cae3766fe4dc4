"""The server half of one method, for both engines (`ServerRunner`): global model, method
and plug-in state, the uploads' NaN/Inf check, aggregation, the plug-in step,
evaluation, the round's record and what a checkpoint holds."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedftg import registry
from fedftg.config import RunConfig
from fedftg.data.batches import DeviceArrays
from fedftg.data.sources import Dataset
from fedftg.engine.evaluate import evaluate, evaluate_ensemble
from fedftg.engine.records import NO_FINITE_UPLOAD, SKIPPED, MethodSummary, RoundRecord
from fedftg.engine.setup import client_half, client_method, server_plugin
from fedftg.fl.aggregation import State
from fedftg.fl.client import (
    LocalResult,
    detached_state,
)
from fedftg.fl.plugin import ServerPlugin, WithClientHalf
from fedftg.fl.selection import select_clients
from fedftg.models import build_model
from fedftg.models.stacked import StackedModels, Teachers
from fedftg.seeding import torch_rng


@dataclass
class MethodState:
    """Everything that evolves during one method's run (what a checkpoint must hold)."""

    global_state: State
    server_state: dict[str, torch.Tensor]
    client_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    round: int = 0
    elapsed_s: float = 0.0
    best_acc: float = 0.0
    last_acc: float | None = None
    last_loss: float | None = None
    rejections: list[str] = field(default_factory=list)  # "round N: why", over the run


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state holds only finite values.

    A finite sum proves every element finite (a NaN or Inf makes the sum NaN or Inf) in
    one read without a boolean copy; only a non-finite sum (or an overflow) needs the
    elementwise check.
    """
    return all(
        bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())
        for v in tensors.values()
        if v.is_floating_point()
    )


NONFINITE_PROBLEMS = (
    "model holds NaN or Inf",
    "upload holds NaN or Inf",
    "loss is not a finite number",
)


def upload_problem(
    state: dict[str, torch.Tensor], upload: dict[str, torch.Tensor], loss: float
) -> str | None:
    """Why a client's upload cannot be aggregated for NaN/Inf (None if all finite): the
    one check both engines apply (the Flower strategy and `MethodRunner`)."""
    for problem, ok in zip(
        NONFINITE_PROBLEMS,
        (all_finite(state), all_finite(upload), math.isfinite(loss)),
        strict=True,
    ):
        if not ok:
            return problem
    return None


def plugin_step(
    plugin: ServerPlugin,
    student: nn.Module,
    teachers: Teachers,
    counts: np.ndarray,
    seed: int,
    round_idx: int,
    device: torch.device,
) -> dict[str, float]:
    """Round ``round_idx``'s (0-based) server plug-in step on ``student``, from the server's
    random stream of that round on ``device``: one place, so that the engines and the
    Flower wrapper (`fedftg.flower.ftg`) draw the same."""
    gen = torch_rng(seed, "server", round_idx, device=device)
    return plugin.step(student, teachers, counts, round_idx, gen)


class ServerRunner:
    """The server half of one method: global model, method and plug-in state, evaluation.

    Used by the in-process simulator (`MethodRunner`) and by the Flower ServerApp, which
    feed it the clients' uploads of a round.
    """

    def __init__(
        self,
        cfg: RunConfig,
        ds: Dataset,
        test: DeviceArrays,
        init_state: State,
        base: str,
        plugin: str | None,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.dataset = ds
        self.test = test
        self.device = device
        self.method = client_method(cfg, base)
        self.plugin_name = plugin
        self.plugin = server_plugin(cfg, plugin, ds, device)
        # whether the plug-in changes the aggregate (then the accuracy before it is measured)
        self.fine_tunes = plugin is not None and registry.plugin(plugin).fine_tunes
        self.client_half = client_half(cfg, plugin, ds, device)
        self.model = build_model(cfg.model, ds.channels, ds.image_size, ds.num_classes)
        self.model.load_state_dict(init_state)
        self.model.to(device)
        self.state = MethodState(
            global_state=detached_state(self.model),
            server_state=self.method.init_server_state(self.model),
        )
        self.diverged: str | None = None  # why the method stopped (None while it is fine)
        self.diverged_round = 0

    def selected(self) -> list[int]:
        """The clients selected for the next round (both engines select alike)."""
        cfg = self.cfg
        chosen = select_clients(
            cfg.clients, cfg.participation, cfg.selection, cfg.seed, self.state.round
        )
        return [int(k) for k in chosen]

    def mark_diverged(self, record: RoundRecord, reason: str) -> None:
        """Record that the method diverged in ``record``'s round."""
        self.diverged, self.diverged_round = reason, record.round_num
        record.diverged = True

    def _rejected(self, record: RoundRecord, rejections: list[str]) -> RoundRecord:
        """``record`` with the round's left-out uploads counted (and kept for the summary)."""
        record.rejected = len(rejections)
        self.state.rejections.extend(rejections)
        return record

    def no_finite_upload(self, rejections: list[str], lr_flag: str, start: float) -> RoundRecord:
        """The record of the next round, whose every upload (``rejections``, the reasons)
        held NaN or Inf: no aggregate, no evaluation, the method marked diverged."""
        round_idx = self.state.round
        record = RoundRecord(round_num=round_idx + 1, outcome=NO_FINITE_UPLOAD)
        record.lr = self.cfg.lr * self.cfg.lr_decay**round_idx
        n = len(rejections)
        self.mark_diverged(
            record, f"all {n} client uploads hold NaN or Inf (try a smaller {lr_flag})"
        )
        return self._timed(self._rejected(record, rejections), start)

    def skip_round(self, rejections: list[str]) -> RoundRecord:
        """The record of the next round, skipped for too few valid uploads: the global
        model is kept and the round counts as run."""
        self.state.round += 1
        record = RoundRecord(round_num=self.state.round, outcome=SKIPPED)
        record.elapsed_s = self.state.elapsed_s
        return self._rejected(record, rejections)

    def server_update(
        self,
        results: list[LocalResult],
        histograms: list[np.ndarray],
        start: float,
        rejections: list[str] | None = None,
    ) -> RoundRecord:
        """Aggregate the round's uploads, run the plug-in, evaluate; the round's record
        (``rejections``: why other uploads of the round were left out)."""
        cfg, st = self.cfg, self.state
        round_idx = st.round
        new_state = self.method.aggregate(st.global_state, results, st.server_state, cfg.clients)
        self.model.load_state_dict(new_state)
        record = RoundRecord(
            round_num=round_idx + 1,
            clients=len(results),
            lr=cfg.lr * cfg.lr_decay**round_idx,
            train_loss=float(np.mean([r.loss for r in results])),
        )
        plugin_losses = [r.plugin_loss for r in results if r.plugin_loss is not None]
        if plugin_losses:  # a plug-in's client term (FedGen), apart from train_loss
            record.train_plugin_loss = float(np.mean(plugin_losses))
        evaluate_now = (round_idx + 1) % cfg.eval_every == 0 or round_idx + 1 == cfg.rounds
        counts = np.stack(histograms)
        teachers: Teachers | None = None
        if self.plugin is not None:
            fine_tunes = self.fine_tunes
            if evaluate_now and fine_tunes:
                record.acc_before_server, _ = evaluate(self.model, self.test, cfg.eval_batch_size)
            server_start = time.perf_counter()
            teachers = self._teacher_models(results)
            metrics = plugin_step(
                self.plugin, self.model, teachers, counts, cfg.seed, round_idx, self.device
            )
            record.server_s = time.perf_counter() - server_start
            record.plugin = {f"{self.plugin_name}_{k}": v for k, v in metrics.items()}
            if fine_tunes:
                self.method.note_server_step(new_state, st.server_state)
                new_state = detached_state(self.model)
        if cfg.eval_ensemble and evaluate_now:
            if teachers is None:  # else reuse the plug-in's (frozen: still the uploads)
                teachers = StackedModels(self.model, [r.state for r in results])
            record.ensemble = evaluate_ensemble(teachers, counts, self.test, cfg.eval_batch_size)
        st.global_state = new_state
        st.round = round_idx + 1
        if not all_finite(new_state):
            self.mark_diverged(record, "the global model holds NaN or Inf")
        elif evaluate_now:
            acc, loss = evaluate(self.model, self.test, cfg.eval_batch_size)
            record.test_acc, record.test_loss = acc, loss
            if math.isfinite(loss):
                st.last_acc, st.last_loss = acc, loss
                st.best_acc = max(st.best_acc, acc)
            else:
                self.mark_diverged(record, "the test loss is not finite")
        return self._timed(self._rejected(record, rejections or []), start)

    def _timed(self, record: RoundRecord, start: float) -> RoundRecord:
        round_s = time.perf_counter() - start
        self.state.elapsed_s += round_s
        record.round_s = round_s
        record.elapsed_s = self.state.elapsed_s
        return record

    def _teacher_models(self, results: list[LocalResult]) -> Teachers:
        """The round's client models as a teacher set for the plug-in: one stacked copy of
        the K states; each result's state then becomes views into it, so the server holds
        the clients' weights once. (A plug-in may run its own loop structure over them,
        e.g. FedFTG's reference path.)"""
        stacked = StackedModels(self.model, [r.state for r in results])
        for j, r in enumerate(results):
            r.state = stacked.state(j)
        return stacked

    def client_payload(self) -> dict[str, torch.Tensor]:
        """What this round's clients receive from the plug-in's server side (its client
        half's input; empty without one)."""
        if self.client_half is None:
            return {}
        if not isinstance(self.plugin, WithClientHalf):
            raise TypeError(
                f"plug-in {self.plugin_name}: a client half but no client_payload on its server"
            )
        return self.plugin.client_payload(self.state.round)

    @property
    def has_samples(self) -> bool:
        """Whether the plug-in declares generated sample images."""
        return registry.plugin_with_samples(self.plugin_name)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this method after its last completed round."""
        st = self.state
        return {
            "global_state": st.global_state,
            "server_state": st.server_state,
            "client_states": {str(k): v for k, v in st.client_states.items()},
            "plugin": self.plugin.state_dict() if self.plugin is not None else {},
            "round": st.round,
            "elapsed_s": st.elapsed_s,
            "best_acc": st.best_acc,
            "last_acc": st.last_acc,
            "last_loss": st.last_loss,
            "rejections": list(st.rejections),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from `checkpoint_state` output (tensors are moved to this device)."""
        dev = self.device
        self.state = MethodState(
            global_state=_to(saved["global_state"], dev),
            server_state=_to(saved["server_state"], dev),
            client_states={int(k): _to(v, dev) for k, v in saved["client_states"].items()},
            round=int(saved["round"]),
            elapsed_s=float(saved["elapsed_s"]),
            best_acc=float(saved["best_acc"]),
            last_acc=saved["last_acc"],
            last_loss=saved["last_loss"],
            rejections=list(saved.get("rejections", [])),  # absent before fedftg kept them
        )
        self.model.load_state_dict(self.state.global_state)
        if self.plugin is not None:
            self.plugin.load_state_dict(saved["plugin"])

    def summary(self) -> MethodSummary:
        """This method's result so far (`MethodSummary`)."""
        st = self.state
        if self.diverged:
            return MethodSummary(
                final_acc=None,
                final_loss=None,
                best_acc=st.best_acc,
                rounds=self.diverged_round,  # the rounds run, the diverged one included
                wall_s=st.elapsed_s,
                diverged_round=self.diverged_round,
                reason=self.diverged,
                rejections=list(st.rejections),
            )
        return MethodSummary(
            final_acc=st.last_acc,
            final_loss=st.last_loss,
            best_acc=st.best_acc,
            rounds=st.round,
            wall_s=st.elapsed_s,
            rejections=list(st.rejections),
        )


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}

"""`fedftg run`: run every requested method on one setup and write the run directory."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

import fedftg
from fedftg.config import RunConfig
from fedftg.data.partition import partition_stats
from fedftg.engine.checkpoint import (
    checkpoint_matches,
    config_fingerprint,
    load_latest,
    save_checkpoint,
)
from fedftg.engine.progress import Reporter
from fedftg.engine.simulation import MethodRunner, Setup, denormalise, output_paths, prepare
from fedftg.errors import UserError
from fedftg.report.files import MetricsLog, atomic_write, json_line, read_metrics, write_json
from fedftg.report.heatmap import save_partition_heatmap
from fedftg.report.plots import plot_curves, plot_samples


def environment(cfg: RunConfig) -> dict[str, Any]:
    """The reproducibility record stored beside the config."""
    device = cfg.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "fedftg": fedftg.__version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed,
    }


def _git_commit() -> str | None:
    """The commit of the fedftg source tree, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_out_dir(path: Path) -> None:
    """Create the run directory; a path that cannot be a directory is a `UserError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"out: {path} exists and is not a directory") from None
    except OSError as exc:
        raise UserError(f"out: cannot create {path} ({exc.strerror or exc})") from None


class _StopFlag:
    """SIGINT/SIGTERM set a flag: the current round finishes, a checkpoint is written, and
    the run stops. A second signal stops at once. ``acknowledge`` is called at the first
    signal, so the user hears at once that it was seen."""

    def __init__(self, acknowledge: Callable[[], None] = lambda: None) -> None:
        self.raised: int | None = None
        self.acknowledge = acknowledge
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised is not None:
            raise KeyboardInterrupt
        self.raised = signum
        self.acknowledge()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """The run was stopped by a signal after checkpointing its last completed round."""


class Diverged(Exception):
    """A method's model or loss became non-finite and ``on_divergence`` is ``stop``."""


ON_DIVERGENCE = ("stop", "continue")


def run_experiment(
    cfg: RunConfig,
    *,
    stream: TextIO | None = None,
    progress: bool | None = None,
    resume: bool = False,
    fresh: bool = False,
    verbosity: int = 1,
    tensorboard: bool = False,
    on_divergence: str = "stop",
) -> dict[str, Any]:
    """Run all methods of ``cfg``; write config.json, metrics.jsonl, summary.json, plots.

    A checkpoint in the run directory written by the same settings is continued from its
    last completed round (``fresh`` ignores it). With ``resume`` a checkpoint from other
    settings is an error; without it, such a run directory is started afresh.
    ``verbosity``: 0 prints nothing, 1 the results table, 2 also one line per round on
    stderr. ``tensorboard`` also writes the round metrics as TensorBoard scalars.
    A method that diverges (NaN/Inf model or loss) gets ``status: diverged`` in the
    summary; ``on_divergence="stop"`` then writes the outputs and raises `Diverged`,
    ``"continue"`` goes on with the other methods.
    Returns the summary (per method: final_acc, best_acc, rounds, wall_s).
    """
    stream = stream or sys.stdout
    if on_divergence not in ON_DIVERGENCE:
        raise UserError(f"on_divergence: expected stop or continue, got {on_divergence!r}")
    reporter = Reporter.for_run(progress, verbosity)
    paths = output_paths(cfg.out)
    make_out_dir(paths["dir"])
    ckpt_path = paths["dir"] / "checkpoint.pt"
    fingerprint = config_fingerprint(cfg.to_dict())
    saved = None
    if not fresh:
        saved, warnings = load_latest(ckpt_path)
        for w in warnings:
            sys.stderr.write(f"warning: {w}\n")
        if saved is not None and not checkpoint_matches(
            saved, cfg.to_dict(), _saved_config(paths["config"])
        ):
            if resume:
                raise UserError(
                    f"{ckpt_path}: checkpoint was written by a run with other settings; "
                    "use the same settings, another --out, or --fresh"
                )
            saved = None
    if resume and saved is None:
        sys.stderr.write(f"warning: no checkpoint in {paths['dir']}; starting afresh\n")
    setup = prepare(cfg)
    write_json(paths["config"], {**cfg.to_dict(), "environment": environment(cfg)})
    save_partition_heatmap(
        setup.partition.counts,
        paths["partition"],
        list(setup.dataset.classes),
        f"{cfg.dataset}: {cfg.clients} clients, {cfg.partition} alpha={cfg.alpha}",
    )
    done: dict[str, Any] = dict(saved["done"]) if saved else {}
    trim_metrics(paths["metrics"], saved)
    log = MetricsLog(paths["metrics"])
    summary: dict[str, Any] = {"methods": {}}
    sample_written = False
    board = TensorBoard(paths["dir"] / "tensorboard") if tensorboard else None
    stopped: Diverged | None = None
    with _StopFlag(reporter.stopping) as stop:
        for display, base, plugin in cfg.methods():
            if display in done:  # finished before the resume: its outputs are written
                summary["methods"][display] = done[display]
                reporter.note(f"{display}: finished before the resume")
                continue
            runner = MethodRunner(setup, base, plugin)
            if saved is not None and saved["current"] == display:
                runner.restore(saved["state"])
            reporter.start_method(display, cfg.rounds, runner.state.round)
            while runner.state.round < cfg.rounds:
                record = runner.run_round()
                log.append({"method": display, **record})
                reporter.round(record)
                if board is not None:
                    board.add(display, record)
                if runner.diverged:
                    break
                every = cfg.checkpoint_every
                finished = runner.state.round == cfg.rounds
                if finished:
                    done[display] = runner.summary()
                if stop.raised or (every and (runner.state.round % every == 0 or finished)):
                    save_run_checkpoint(
                        ckpt_path, fingerprint, done, display, runner.checkpoint_state()
                    )
                if stop.raised:
                    reporter.end_method()
                    raise Interrupted(
                        f"stopped after round {runner.state.round} of {display}; "
                        "rerun the same command to continue"
                    )
            reporter.end_method()
            summary["methods"][display] = runner.summary()
            if runner.diverged:
                message = f"{display} diverged at round {runner.diverged_round}: {runner.diverged}"
                if on_divergence == "stop":
                    stopped = Diverged(message)
                    break
                sys.stderr.write(f"warning: {message}; going on (--on-divergence continue)\n")
                done[display] = summary["methods"][display]
                continue
            if runner.has_samples:
                if _write_samples(runner, setup, paths["dir"] / f"samples_{_slug(display)}.png"):
                    if not sample_written:
                        sample_written = _write_samples(runner, setup, paths["samples"])
    if board is not None:
        board.close()
    summary["partition"] = partition_stats(setup.partition)
    summary["config"] = cfg.to_dict()
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(paths["summary"], summary)
    title = f"{cfg.dataset}, {cfg.clients} clients, {cfg.partition} alpha={cfg.alpha}"
    plot_curves(read_metrics(paths["metrics"]), paths["curves"], title)
    if stopped is not None:
        raise stopped
    if verbosity >= 1:
        stream.write(format_table(summary["methods"]) + "\n")
        for line in plugin_gains(cfg, summary["methods"]):
            stream.write(line + "\n")
        stream.write(f"results in {paths['dir']}\n")
    return summary


def _saved_config(path: Path) -> dict[str, Any] | None:
    """The settings recorded in a run directory's config.json (None if unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_run_checkpoint(
    path: Path, fingerprint: str, done: dict, current: str, state: dict
) -> None:
    save_checkpoint(
        path, {"fingerprint": fingerprint, "done": done, "current": current, "state": state}
    )


def trim_metrics(path: Path, saved: dict[str, Any] | None) -> None:
    """Keep only the metrics the checkpoint accounts for (none without a checkpoint)."""
    if saved is None:
        path.unlink(missing_ok=True)
        return
    rounds = {name: done["rounds"] for name, done in saved["done"].items()}
    rounds[saved["current"]] = saved["state"]["round"]
    kept = [r for r in read_metrics(path) if r.get("round", 0) <= rounds.get(r.get("method"), 0)]
    text = "".join(json_line(r) for r in kept)
    atomic_write(path, lambda p: p.write_text(text))


def _write_samples(runner: MethodRunner, setup: Setup, path: Any) -> bool:
    gen = torch.Generator(device=setup.device)
    gen.manual_seed(setup.cfg.seed)
    images, labels = runner.plugin.sample_images(8, gen)
    if not bool(torch.isfinite(images).all()):
        sys.stderr.write(f"warning: {path} not written: the generator's images are not finite\n")
        return False
    plot_samples(
        denormalise(images, setup.dataset),
        labels.cpu().numpy(),
        list(setup.dataset.classes),
        path,
    )
    return True


def _slug(name: str) -> str:
    return name.replace("+", "_")


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """A plain-text results table: method, final and best accuracy, wall-clock."""
    lines = [f"{'method':<16} {'final acc':>9} {'best acc':>9} {'rounds':>6} {'wall s':>8}"]
    for name, s in methods.items():
        final = "-" if s["final_acc"] is None else f"{100 * s['final_acc']:.2f}"
        note = f"  diverged at round {s['diverged_round']}" if "diverged_round" in s else ""
        lines.append(
            f"{name:<16} {final:>9} {100 * s['best_acc']:>9.2f} {s['rounds']:>6} "
            f"{s['wall_s']:>8.1f}{note}"
        )
    return "\n".join(lines)


def plugin_gains(cfg: RunConfig, methods: dict[str, dict[str, Any]]) -> list[str]:
    """One line per server plug-in run whose base method ran too: the accuracy difference."""
    by_base = {(b, p): name for name, b, p in cfg.methods()}
    lines = []
    for (base, plugin), name in by_base.items():
        plain = by_base.get((base, None))
        if plugin is None or plain is None:
            continue
        a, b = methods[name], methods[plain]
        if a["final_acc"] is None or b["final_acc"] is None:
            continue
        lines.append(
            f"{name} vs {plain}: {100 * (a['final_acc'] - b['final_acc']):+.2f} points final, "
            f"{100 * (a['best_acc'] - b['best_acc']):+.2f} points best accuracy"
        )
    return lines


class TensorBoard:
    """Round metrics as TensorBoard scalars, one run folder per method (optional extra)."""

    def __init__(self, root: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "tensorboard: the 'tensorboard' package is not installed "
                "(pip install 'fedftg[tensorboard]')"
            ) from None
        self._cls = SummaryWriter
        self.root = root
        self.writers: dict[str, Any] = {}

    def add(self, method: str, record: dict[str, Any]) -> None:
        if method not in self.writers:
            self.writers[method] = self._cls(str(self.root / method.replace("+", "_")))
        w = self.writers[method]
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and value is not None:
                w.add_scalar(key, value, record["round"])

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

"""The run directory: what `fedftg run` and the fedftg Flower ServerApp write, and the rules
for a directory that already holds a run.

One component for both engines, so their directories hold the same files (config.json,
metrics.jsonl, summary.json, curves.png, partition.png, samples*.png for plug-ins with
generated samples, checkpoint.pt) and follow the same rules:

- A directory belongs to one run. A rerun with the same settings continues it from its
  checkpoint; with other settings it is refused (`UserError`, exit 2) naming the settings
  that differ and the ways on: ``--fresh`` replaces it, another ``--out`` keeps it.
  ``--resume`` may raise ``--rounds`` (extending a finished run) when the rest matches.
- A directory is held by one process at a time (`fedftg.engine.dirlock`): `RunDir.open`
  creates it if needed and locks it before reading anything in it; a second run into a
  held directory is refused at once, naming the holder's pid and start time. The lock
  goes when the engine closes the `RunDir` (it is a context manager) or its process ends.
- `RunDir.open` then only reads; nothing else in the directory is touched until
  `RunDir.start`, which the engines call once every check (settings, data, optional
  dependencies, nodes) has passed. A run that fails before it starts leaves the directory
  as it was (one `open` created is removed again).
- ``{time}`` in ``out`` (the default ``runs/{time}``) becomes the start time; the directory
  is claimed atomically (`os.mkdir`), a name already taken giving the next (``-2``,
  ``-3``), so runs started together never share one; ``<parent>/latest`` is then a
  symlink to the newest.
- A checkpoint holds the metrics rows of the rounds it covers. At its start a continued
  run rewrites metrics.jsonl as those rows: a row cut short by a crash (or missing) comes
  back from the checkpoint, with a warning; rows after the checkpoint go, and their rounds
  run again.
- A finished run keeps a small checkpoint: each method's global model, server and plug-in
  state, without per-client state (all of it with ``keep_checkpoint``). That is enough to
  extend it exactly, except a method with per-client state (SCAFFOLD, FedDyn, MOON) whose
  clients' state was not kept: extending that is refused.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

import fedftg
from fedftg.config import RunConfig, differing_settings, fingerprint, flatten_sections
from fedftg.data.partition import Partition, partition_label, partition_stats
from fedftg.data.sources import Dataset
from fedftg.engine.checkpoint import (
    checkpoint_matches,
    config_fingerprint,
    load_latest,
    remove_previous,
    save_checkpoint,
)
from fedftg.engine.dirlock import LOCK_NAME, DirLock, LockHeld
from fedftg.engine.records import RoundRecord
from fedftg.engine.server import ServerRunner
from fedftg.errors import UserError
from fedftg.fl.plugin import WithSamples
from fedftg.legacy import OLD_RUN_FILES, round_candidates, rows_covered
from fedftg.plugins.distill import within_class_distance
from fedftg.report.files import (
    MetricsLog,
    atomic_write,
    json_line,
    line_numbers,
    make_dirs,
    read_metrics_lines,
    remove_empty_dirs,
    remove_stale_tmp,
    write_error,
    write_json,
)
from fedftg.report.heatmap import save_partition_heatmap
from fedftg.report.plots import plot_curves, plot_samples, spread_note
from fedftg.threads import in_force

TIME = "{time}"
CHECKPOINT = "checkpoint.pt"
# what a run writes (besides samples_<method>.png and tensorboard/), and what older runs
# wrote (`fedftg.legacy.OLD_RUN_FILES`): --fresh removes these
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "partition.png",
    *OLD_RUN_FILES,
    CHECKPOINT,
    CHECKPOINT + ".prev",
)


@dataclass(frozen=True)
class Hints:
    """How the user says "replace it", "use another directory" and "extend it"."""

    fresh: str
    out: str
    resume: str


CLI_HINTS = Hints(fresh="--fresh", out="another --out", resume="--resume")
FLOWER_HINTS = Hints(fresh="fresh=true", out="another out", resume="resume=true")


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def out_names(out: str, now: float | None = None) -> Iterator[Path]:
    """The names to try in turn for an ``out`` with ``{time}``: the local start time
    (``20261203-101500``), then the same with ``-2``, ``-3``, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    yield Path(out.replace(TIME, stamp))
    for n in itertools.count(2):
        yield Path(out.replace(TIME, f"{stamp}-{n}"))


def claim_out(out: str, now: float | None = None) -> tuple[Path, bool, list[Path]]:
    """The run directory of ``out``, created (with its parents) if missing: with ``{time}``
    the first of `out_names` that this call creates itself (`os.mkdir` fails on a name
    another run took), so runs started together never share one. Returns it, whether
    ``out`` had the placeholder, and the folders made (`fedftg.report.files.make_dirs`)."""
    if TIME not in out:
        path = Path(out)
        check_writable(path)
        try:
            return path, False, make_dirs(path)
        except OSError as exc:
            raise write_error(path, exc) from None
    names = out_names(out, now)
    path = next(names)
    check_writable(path)
    try:
        made = make_dirs(path.parent)
    except OSError as exc:
        raise write_error(path.parent, exc) from None
    while True:
        try:
            os.mkdir(path)
        except FileExistsError:
            path = next(names)
            continue
        except OSError as exc:
            remove_empty_dirs(made)
            raise write_error(path, exc) from None
        return path, True, [*made, path]


def link_latest(path: Path, warn: Callable[[str], None] = _stderr_warning) -> None:
    """Point ``<parent>/latest`` at ``path`` (a relative symlink, replaced atomically). A
    real file or folder named ``latest`` (from fedftg before timestamped runs) is left."""
    link = path.parent / "latest"
    if link.exists() and not link.is_symlink():
        warn(f"{link} is not a symlink (an older run?); not pointing it at {path.name}")
        return
    tmp = link.with_name(f".latest.{secrets.token_hex(4)}.tmp")
    try:
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    except OSError as exc:  # e.g. no symlinks on this file system: the run is unaffected
        tmp.unlink(missing_ok=True)
        warn(f"cannot link {link} to {path.name} ({exc.strerror or exc})")


def check_writable(path: Path) -> None:
    """A `UserError` unless ``path`` is, or can be created as, a writable directory."""
    if path.exists():
        if not path.is_dir():
            raise UserError(f"out: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"out: {path} is not writable")
        return
    parent = path.parent
    while not (parent.exists() or parent == parent.parent):
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"out: cannot create {path} ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out: cannot create {path} ({parent} is not writable)")


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
        **in_force(),
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


def saved_states(saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Method -> state held by checkpoint ``saved``: the finished methods' final states
    (``final``, absent before fedftg kept them) and the current method's."""
    states = dict(saved.get("final") or {})
    if saved.get("current") and saved.get("state") is not None:
        states.setdefault(saved["current"], saved["state"])
    return states


def small_state(state: dict[str, Any]) -> dict[str, Any]:
    """A method state without its per-client part (marked when there was any)."""
    dropped = any(bool(v) for v in state["client_states"].values())
    return {**state, "client_states": {}, "client_states_dropped": dropped}


def _cpu(obj: Any) -> Any:
    """A CPU copy of the tensors in a nested state (so finished methods free the device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


class RunDir:
    """One run's directory: `open` decides what to do with what is there (reads only),
    `start` writes the run's first files, the engine reports rounds and finished methods,
    `finish` writes summary, curves and the final checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        path: Path,
        *,
        engine: str,
        link: bool,
        keep_checkpoint: bool,
        hints: Hints,
        warn: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.engine = engine
        self.paths = output_paths(path)
        self.checkpoint_path = path / CHECKPOINT
        self.keep_checkpoint = keep_checkpoint
        self.hints = hints
        self.warn = warn
        self._link = link
        self._replace = False  # the directory's run files go at `start`
        self.saved: dict[str, Any] | None = None  # the checkpoint continued from
        self.done: dict[str, dict[str, Any]] = {}  # method -> summary of its finished rounds
        self.final: dict[str, dict[str, Any]] = {}  # method -> state after its last round
        self._log: MetricsLog | None = None
        self.rows: list[dict[str, Any]] = []  # metrics.jsonl's rows, as read back from JSON
        self._lock: DirLock | None = None
        self._made: list[Path] = []  # folders `open` created (removed if the run never starts)
        self._started = False
        self._fingerprint = config_fingerprint(cfg.to_dict())

    # ------------------------------------------------------------------ checks (read only)

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        *,
        engine: str,
        fresh: bool = False,
        resume: bool = False,
        keep_checkpoint: bool = False,
        hints: Hints = CLI_HINTS,
        warn: Callable[[str], None] = _stderr_warning,
    ) -> RunDir:
        """The run directory of ``cfg``, locked for this process, and what to do with it; a
        `UserError` if it cannot be this run's (held by another process, other settings,
        not writable). Writes nothing but the directory and its lock file; `close` (or
        leaving a ``with`` block) releases it."""
        path, templated, made = claim_out(cfg.out)
        cfg = cfg.copy()
        cfg.out = str(path)
        run = cls(
            cfg,
            path,
            engine=engine,
            link=templated,
            keep_checkpoint=keep_checkpoint,
            hints=hints,
            warn=warn,
        )
        run._made = made
        try:
            run._lock = DirLock.acquire(path)
        except LockHeld as exc:
            run.close()
            raise UserError(
                f"out: {path} is in use by another run ({exc.holder}); wait for it to end, "
                f"or use {hints.out}"
            ) from None
        except BaseException as exc:
            run.close()
            if isinstance(exc, OSError):
                raise write_error(path / LOCK_NAME, exc) from None
            raise
        try:
            run._decide(fresh, resume)
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        """Release the directory. One the run never started in is left as it was found:
        the lock file, and the folders `open` created, are removed."""
        if self._lock is not None:
            self._lock.release()
        if not self._started:
            remove_empty_dirs(self._made)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _present(self) -> list[str]:
        """The run files in the directory."""
        if not self.path.is_dir():
            return []
        names = [n for n in RUN_FILES if (self.path / n).exists()]
        return names + sorted(p.name for p in self.path.glob("samples_*.png"))

    def _decide(self, fresh: bool, resume: bool) -> None:
        present = self._present()
        if not present:
            if resume:
                self.warn(f"no checkpoint in {self.path}; starting afresh")
            return
        if fresh:
            self._replace = True
            return
        saved_config = _read_json(self.paths["config"])
        saved, warnings = load_latest(self.checkpoint_path)
        for w in warnings:
            self.warn(w)
        if saved is None:
            self._without_checkpoint(saved_config, present)
            return
        then = self._checkpoint_rounds(saved, saved_config)
        if then is None:
            raise self._other_settings(saved_config)
        if self.cfg.rounds != then and not (resume and self.cfg.rounds > then):
            raise self._other_rounds(then)
        self._check_extensible(saved)
        self.saved = saved
        self.done = dict(saved["done"])
        self.final = dict(saved.get("final") or {})

    def _without_checkpoint(self, saved_config: dict[str, Any] | None, present: list[str]) -> None:
        """A run directory without a usable checkpoint: the same settings start it over."""
        if saved_config is None:
            raise UserError(
                f"out: {self.path} holds run files ({', '.join(present)}) but neither "
                f"config.json nor a checkpoint to tell its settings; {self.hints.fresh} "
                f"replaces them, or use {self.hints.out}"
            )
        if fingerprint(saved_config) != fingerprint(self.cfg.to_dict()):
            raise self._other_settings(saved_config, can_extend=False)
        self.warn(f"no checkpoint in {self.path}; starting the run over (same settings)")
        self._replace = True

    def _checkpoint_rounds(
        self, saved: dict[str, Any], saved_config: dict[str, Any] | None
    ) -> int | None:
        """The round count of the run that wrote ``saved`` if, that aside, its settings are
        this run's (None if they differ). Checkpoints record it; older ones through their
        config.json or, failing that, by matching at this run's rounds."""
        now = self.cfg.to_dict()
        for rounds in round_candidates(saved, saved_config, self.cfg.rounds):
            if checkpoint_matches(saved, {**now, "rounds": rounds}, saved_config):
                return rounds
        return None

    def _check_extensible(self, saved: dict[str, Any]) -> None:
        """Every finished method that must run more rounds has a state to continue from."""
        states = saved_states(saved)
        for name, summary in saved["done"].items():
            if summary["rounds"] >= self.cfg.rounds:
                continue
            state = states.get(name)
            if state is None:
                raise UserError(
                    f"{self.checkpoint_path}: {name} finished before fedftg kept final "
                    f"states, so it cannot be extended; {self.hints.fresh} reruns it"
                )
            if state.get("client_states_dropped"):
                raise UserError(
                    f"{self.checkpoint_path}: {name} keeps per-client state, which the "
                    "finished run did not keep (--keep-checkpoint), so it cannot be "
                    f"extended exactly; {self.hints.fresh} reruns it"
                )

    def _other_settings(
        self, saved_config: dict[str, Any] | None, can_extend: bool = True
    ) -> UserError:
        now = self.cfg.to_dict()
        names = differing_settings(saved_config, now) if saved_config else []
        old, new = flatten_sections(saved_config or {}), flatten_sections(now)
        shown = ", ".join(f"{k} {old.get(k, '?')} -> {new.get(k, '?')}" for k in names)
        extend = ""
        if can_extend and names == ["rounds"] and isinstance(old.get("rounds"), int):
            if self.cfg.rounds > old["rounds"]:
                extend = f", or {self.hints.resume} to extend it to {self.cfg.rounds} rounds"
        return UserError(
            f"out: {self.path} holds a run with other settings ({shown or 'see its config.json'}"
            f"); {self.hints.fresh} replaces it, or use {self.hints.out}{extend}"
        )

    def _other_rounds(self, then: int) -> UserError:
        if self.cfg.rounds > then:
            return UserError(
                f"out: {self.path} holds a run of {then} rounds; {self.hints.resume} extends "
                f"it to {self.cfg.rounds}, {self.hints.fresh} replaces it, or use "
                f"{self.hints.out}"
            )
        return UserError(
            f"out: {self.path} holds a run of {then} rounds, which cannot shrink to "
            f"{self.cfg.rounds}; {self.hints.fresh} replaces it, or use {self.hints.out}"
        )

    # ------------------------------------------------------------------ writing

    def start(self, partition: Partition, dataset: Dataset) -> None:
        """Create the directory (clearing stale temporary files and, if replaced, the old
        run's files), write config.json and partition.png, keep the metrics the checkpoint
        accounts for (restoring rows it holds that the file lost). Call only after every
        check has passed."""
        self._started = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        remove_stale_tmp(self.path)
        if self._replace:
            self._remove_run_files()
        elif not all(map(self.is_finished, self.done)):
            # extending: the summary of the shorter run goes (a report or a sweep would take
            # it for this run's if the extension stopped early); finishing writes the new one
            self._remove(self.paths["summary"])
        extra = {"environment": environment(self.cfg), "engine": self.engine}
        write_json(self.paths["config"], {**self.cfg.to_dict(), **extra})
        cfg = self.cfg
        save_partition_heatmap(
            partition.counts,
            self.paths["partition"],
            list(dataset.classes),
            f"{cfg.dataset}: {cfg.clients} clients, {partition_label(vars(cfg))}",
        )
        self.rows = restore_metrics(self.paths["metrics"], self.saved, self.warn)
        self._log = MetricsLog(self.paths["metrics"])
        if self._link:
            link_latest(self.path, self.warn)

    def _remove_run_files(self) -> None:
        doomed = [self.path / n for n in RUN_FILES] + list(self.path.glob("samples_*.png"))
        board = self.path / "tensorboard"
        self._remove(*doomed)
        if board.is_dir():
            try:
                shutil.rmtree(board)
            except OSError as exc:
                raise write_error(Path(exc.filename or self.path), exc) from None

    def _remove(self, *paths: Path) -> None:
        try:
            for p in paths:
                p.unlink(missing_ok=True)
        except OSError as exc:
            raise write_error(Path(exc.filename or self.path), exc) from None

    def is_finished(self, method: str) -> bool:
        """Whether ``method`` has run all rounds already (its outputs are written)."""
        return method in self.done and self.done[method]["rounds"] >= self.cfg.rounds

    def restore_point(self, method: str) -> dict[str, Any] | None:
        """The saved state ``method`` continues from (None: from the start)."""
        return saved_states(self.saved).get(method) if self.saved is not None else None

    def rounds_done(self, method: str) -> int:
        """The rounds ``method`` has behind it in the checkpoint continued from (0: none)."""
        saved = self.restore_point(method)
        return int(saved["round"]) if saved is not None else 0

    def append(self, method: str, record: RoundRecord) -> None:
        """One round's record to metrics.jsonl."""
        assert self._log is not None, "start() first"
        row = json.loads(json_line({"method": method, **record.to_row()}))  # as resumes read it
        try:
            self._log.append(row)
        except OSError as exc:
            raise write_error(self.paths["metrics"], exc) from None
        self.rows.append(row)

    def end_round(self, method: str, runner: ServerRunner, force: bool = False) -> None:
        """After each round: note a method that has finished, checkpoint every
        ``checkpoint_every`` rounds, at a method's last round and when ``force``d."""
        round_num, every = runner.state.round, self.cfg.checkpoint_every  # rounds done
        finished = round_num >= self.cfg.rounds
        if finished:
            self._note_finished(method, runner)
        if force or (every and (round_num % every == 0 or finished)):
            current = None if finished else runner.checkpoint_state()
            self._save(method if current is not None else None, current)

    def method_finished(
        self, method: str, runner: ServerRunner, samples: bool = True
    ) -> dict[str, Any]:
        """After a method's last round (or its divergence): its summary; writes its
        generated samples to samples_<method>.png unless ``samples`` is false (a diverged
        generator's are noise); one file per method, none shared (no samples.png)."""
        if method not in self.done or self.done[method]["rounds"] < runner.state.round:
            self._note_finished(method, runner)
        if samples and runner.has_samples:
            path = self.path / f"samples_{method.replace('+', '_')}.png"
            self._write_samples(method, runner, path)
        return self.done[method]

    def finish(self, methods: dict[str, dict[str, Any]], partition: Partition) -> dict[str, Any]:
        """summary.json, curves.png and the final checkpoint; returns the summary."""
        cfg = self.cfg
        summary: dict[str, Any] = {
            "methods": methods,
            "engine": self.engine,
            "partition": partition_stats(partition),
            "config": cfg.to_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(self.paths["summary"], summary)
        title = f"{cfg.dataset}, {cfg.clients} clients, {partition_label(vars(cfg))}"
        plot_curves(self.rows, self.paths["curves"], title)
        if cfg.checkpoint_every and not self.keep_checkpoint:
            self._save(None, None)  # the small final checkpoint replaces the last full one
            remove_previous(self.checkpoint_path)
        return summary

    def _note_finished(self, method: str, runner: ServerRunner) -> None:
        self.done[method] = runner.summary().to_dict()
        state = _cpu(runner.checkpoint_state())
        self.final[method] = state if self.keep_checkpoint else small_state(state)

    def _save(self, current: str | None, state: dict[str, Any] | None) -> None:
        save_checkpoint(
            self.checkpoint_path,
            {
                "fingerprint": self._fingerprint,
                "rounds": self.cfg.rounds,
                "done": self.done,
                "final": self.final,
                "current": current,
                "state": state,
                "rows": self.rows,
            },
        )

    def _write_samples(self, method: str, runner: ServerRunner, path: Path) -> None:
        """8 generated images per class, titled with the method, round and dataset, and
        their within-class spread against real images' (`spread_note`)."""
        gen = torch.Generator(device=runner.device)
        gen.manual_seed(self.cfg.seed)
        plugin = cast(WithSamples, runner.plugin)  # its spec declares samples
        images, labels = plugin.sample_images(SAMPLES_PER_CLASS, gen)
        if not bool(torch.isfinite(images).all()):
            _stderr_warning(f"{path} not written: the generator's images are not finite")
            return
        ds = runner.dataset
        title = f"{method}, round {runner.state.round}, {ds.name}"
        note = spread_note(within_class_distance(images, labels), real_spread(runner), ds.name)
        classes = list(ds.classes)
        plot_samples(denormalise(images, ds), labels.cpu().numpy(), classes, path, title, note)


# generated images per class in samples_<method>.png (and real ones in their spread)
SAMPLES_PER_CLASS = 8


def real_spread(runner: ServerRunner) -> float | None:
    """The within-class spread of real test images, the first `SAMPLES_PER_CLASS` of each
    class on the model's normalised scale: the yardstick of a generator's spread."""
    y = runner.test.y
    idx = torch.cat(
        [torch.nonzero(y == c).flatten()[:SAMPLES_PER_CLASS] for c in range(int(y.max()) + 1)]
    )
    x, labels = runner.test.batch(idx)
    return within_class_distance(x, labels)


def restore_metrics(
    path: Path, saved: dict[str, Any] | None, warn: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl as the rows checkpoint ``saved`` covers (none without a
    checkpoint) and return them. Rows after the checkpoint go: their rounds run again.

    A checkpoint holds its rows: one the file lost (a line cut short by a crash or a full
    disk, or missing) is restored from it, with a warning. A checkpoint from before fedftg
    kept rows has none: the file's rows it covers are kept, and a covered round without a
    row is named in a warning, as nothing can restore it."""
    if saved is None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from None
        return []
    rows, broken = read_metrics_lines(path)
    if "rows" in saved:
        kept = list(saved["rows"])
        have = {json_line(r) for r in rows}
        restored = [r for r in kept if json_line(r) not in have]
        if restored:
            warn(
                f"{path}: restored {_row_names(restored)} from the checkpoint "
                f"({line_numbers(broken)} broken)"
            )
    else:
        kept, lost = rows_covered(saved, saved_states(saved), rows)
        if lost:
            warn(
                f"{path}: no row for {_row_names(lost)} ({line_numbers(broken)} broken), "
                "and the checkpoint (from an older fedftg) holds none to restore"
            )
    text = "".join(json_line(r) for r in kept)
    atomic_write(path, lambda p: p.write_text(text))
    return kept


def _row_names(rows: list[dict[str, Any]]) -> str:
    """``fedavg round 3, fedftg round 1`` for a warning."""
    return ", ".join(f"{r.get('method')} round {r.get('round')}" for r in rows)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path`` (None if missing or unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def denormalise(x: torch.Tensor, ds: Dataset) -> np.ndarray:
    """Normalised images back to [0, 1] pixels for display."""
    mean = torch.tensor(ds.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1).detach().cpu().numpy()


def output_paths(out: str | Path) -> dict[str, Path]:
    d = Path(out)
    return {
        "dir": d,
        "config": d / "config.json",
        "metrics": d / "metrics.jsonl",
        "summary": d / "summary.json",
        "curves": d / "curves.png",
        "partition": d / "partition.png",
    }

"""Compatibility with what older fedftg versions wrote and accepted, in one place.

Run directories outlive the code that wrote them: a sweep skips its finished points and an
interrupted run continues only while today's code recognises them, and scripts keep the
names they were written with. Every historical format fedftg still accepts, and why:

1. Flat setting names (before settings moved into per-method sections): ``prox_mu`` for
   ``fedprox.mu``, ``scaffold_server_lr``, ``moon_tau``, ... (a setting's ``legacy_key``).
   Old command lines (``--prox-mu``), TOML files, Flower run configs and the config.json of
   run directories from that time use them (`flat_names`, `flat_name`).
2. Saved configs without a setting added later: the setting reads as its ``before`` value,
   which reproduces the behaviour from before it existed, so those runs keep their
   fingerprint, resume and count as finished (`fill_before`).
3. Checkpoints written before the settings registry (v0, up to commit 3f29c5a): they carry
   the fingerprint of that time, which hashed every setting of the first version whatever
   the methods (``always_hashed``) under its flat name, and later settings only away from
   their ``before`` value and when a method read them (`fingerprint_v0`); such a checkpoint
   is recognised through its run directory's config.json, then compared by today's rule
   (`matches_v0`). tests/test_registry.py proves it on a run directory in that format.
4. Checkpoints without ``rounds`` (before fedftg recorded it): the round count comes from
   config.json, else from matching at the new run's rounds (`round_candidates`).
5. Checkpoints without ``rows`` (before they held their metric rows): the rows of
   metrics.jsonl they cover are kept, a covered round without a row is reported
   (`rows_covered`).
6. Files older runs wrote and today's do not: ``samples.png`` (before one sample grid per
   method), removed with the run's other files by ``--fresh`` (`OLD_RUN_FILES`).

Two older forms are met where they are read, as one expression each: a checkpoint without
``final`` (before finished methods kept their state) has no state to extend a finished
method from (`fedftg.engine.rundir.saved_states`), and a real folder named ``latest``
(before timestamped run directories) is left alone (`fedftg.engine.rundir.link_latest`).

Every fingerprint, today's and v0's, is the same `digest` of the kept settings; changing it
would orphan every run directory.

This module reads declarations (`fedftg.settings`, `fedftg.registry`) and configs handed to
it; `fedftg.config`, `fedftg.engine.checkpoint`, `fedftg.engine.rundir` and `fedftg.cli` call
it, and it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedftg import registry
from fedftg.settings import MISSING, Meta, fields

if TYPE_CHECKING:
    import dataclasses

    from fedftg.config import RunConfig


OLD_RUN_FILES = ("samples.png",)


def digest(kept: dict[str, Any]) -> str:
    """The hash of a run's fingerprinted settings (the same for every format)."""
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------- 1. flat names


def flat_names() -> dict[str, str]:
    """Flat names of settings that moved into sections: ``{"prox_mu": "fedprox.mu"}``."""
    return {
        m.legacy_key: f"{section}.{f.name}"
        for section, cls in registry.sections().items()
        for f, m in fields(cls)
        if m.legacy_key
    }


def flat_name(section: str, name: str) -> str | None:
    """The flat name section setting ``section.name`` had, or None."""
    return next((k for k, v in flat_names().items() if v == f"{section}.{name}"), None)


# ------------------------------------------------------------ 2. settings added later


def _declared(cfg: RunConfig) -> Iterator[tuple[Any, str | None, dataclasses.Field, Meta]]:
    """(holder, section or None, field, meta) of every setting of ``cfg``."""
    for f, m in fields(cfg):
        if f.name != "sections":
            yield cfg, None, f, m
    for section, s in cfg.sections.items():
        for f, m in fields(s):
            yield s, section, f, m


def fill_before(cfg: RunConfig) -> RunConfig:
    """Set, in place, every setting that declares a ``before`` value to it: a saved config
    then read over ``cfg`` gives the settings it lacks their behaviour of its time."""
    for holder, _, f, m in _declared(cfg):
        if m.before is not MISSING:
            setattr(holder, f.name, m.before)
    return cfg


# ---------------------------------------------------------- 3. v0 checkpoint fingerprints


def fingerprint_v0(cfg: RunConfig) -> str:
    """The fingerprint fedftg wrote into checkpoints before the settings registry, of a
    config read from its saved dict (settings it lacks at their ``before`` value)."""
    kept: dict[str, Any] = {}
    for holder, section, f, m in _declared(cfg):
        value = getattr(holder, f.name)
        if m.before is not MISSING and value == m.before:
            continue
        if section is None:
            if not m.resumable:
                kept[f.name] = value
            continue
        if not m.always_hashed and not any(
            registry.reads(meth, section, f.name) for meth in cfg.method
        ):
            continue
        if m.legacy_key:
            kept[m.legacy_key] = value
        else:
            kept.setdefault(section, {})[f.name] = value
    return digest(kept)


def matches_v0(stored: Any, now: RunConfig, then: RunConfig | None, same_today: bool) -> bool:
    """Whether a checkpoint fingerprinted ``stored`` is a v0 checkpoint of the run ``now``.

    ``then`` is the run directory's config.json as read (None without one), ``same_today``
    whether today's fingerprints of ``then`` and ``now`` agree. The v0 hash also counted
    settings no method read: when config.json hashes to ``stored`` it identifies the
    checkpoint and today's rule compares the runs; else ``now`` must hash to it.
    """
    if then is not None and fingerprint_v0(then) == stored:
        return same_today
    return fingerprint_v0(now) == stored


# ------------------------------------------------------- 4. and 5. older checkpoint keys


def round_candidates(
    saved: dict[str, Any], saved_config: dict[str, Any] | None, rounds: int
) -> list[int]:
    """The round counts the run that wrote checkpoint ``saved`` may have had, most certain
    first: its own record, its config.json's (older checkpoints), this run's ``rounds``."""
    candidates = [saved.get("rounds"), (saved_config or {}).get("rounds"), rounds]
    return list(dict.fromkeys(r for r in candidates if isinstance(r, int)))


def rows_covered(
    saved: dict[str, Any], states: dict[str, dict[str, Any]], rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For a checkpoint without rows: the ``rows`` (of metrics.jsonl) it covers, and the
    ``{"method", "round"}`` of each covered round without a row. ``states`` are the method
    states the checkpoint holds (`fedftg.engine.rundir.saved_states`)."""
    covered = {name: done["rounds"] for name, done in saved["done"].items()}
    for name, state in states.items():
        covered[name] = max(covered.get(name, 0), int(state["round"]))
    kept = [r for r in rows if r.get("round", 0) <= covered.get(r.get("method"), 0)]
    have = {(r.get("method"), r.get("round")) for r in kept}
    lost = [
        {"method": name, "round": n}
        for name, last in covered.items()
        for n in range(1, last + 1)
        if (name, n) not in have
    ]
    return kept, lost

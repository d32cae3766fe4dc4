"""The `fedftg` command: `run` experiments, inspect a `partition`, `bench` the fast paths.

Every setting of `RunConfig` is a flag (`--local-epochs 5`, `--ftg-iterations 10`); a TOML
file given with `--config` is applied first, flags override it. Bad input ends with one
`error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedftg import registry
from fedftg.config import (
    RunConfig,
    Source,
    coerce,
    config_from_dict,
    core_fields,
    file_source,
    method_help,
    nest_dotted,
    settings_from,
)
from fedftg.data.sources import shaped_datasets
from fedftg.errors import UserError
from fedftg.legacy import flat_name
from fedftg.models import MODELS
from fedftg.settings import fields

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one `error:` line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(EXIT_USAGE)


class _BoolValue(argparse.Action):
    """``--x`` alone is true; ``--x V`` / ``--x=V`` takes the usual spellings of true and
    false (`fedftg.config.coerce`); its twin ``--no-x`` (`_flag`) stores false."""

    def __call__(self, parser: Any, ns: argparse.Namespace, value: Any, option: Any = None):
        try:
            setattr(ns, self.dest, True if value is None else coerce(option, bool, value))
        except UserError as exc:
            raise argparse.ArgumentError(self, str(exc).split(": ", 1)[1]) from None


def _flag(parser: Any, dest: str, flags: list[str], kind: Any, help_text: str) -> None:
    """One setting's flags; a boolean gets ``--x [true|false]`` and ``--no-x`` for each name."""
    if kind is bool:  # the hidden --no-x first: the shown --x is the dest's last action
        parser.add_argument(
            *("--no-" + f[2:] for f in flags),
            dest=dest,
            action="store_false",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
        parser.add_argument(
            *flags,
            dest=dest,
            action=_BoolValue,
            nargs="?",
            metavar="true|false",
            default=argparse.SUPPRESS,
            help=f"{help_text}; {', '.join('--no-' + f[2:] for f in flags)}: false",
        )
    else:
        parser.add_argument(
            *flags, dest=dest, default=argparse.SUPPRESS, metavar="V", help=help_text
        )


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: the shared ones, then a group per method / plug-in section
    (`fedftg.registry`); settings that had a flat name before sections keep it as an alias."""
    hints = typing.get_type_hints(RunConfig)
    group = parser.add_argument_group("run settings (defaults in brackets)")
    defaults = RunConfig()
    for f, m in core_fields():
        if m.hidden:
            continue
        help_text = method_help() if f.name == "method" else m.help_text()
        shown = f" [{_shown(getattr(defaults, f.name))}]"
        _flag(group, f.name, ["--" + f.name.replace("_", "-")], hints[f.name], help_text + shown)
    for section, cls in registry.sections().items():
        sub = parser.add_argument_group(f"{section}: {registry.section_summary(section)}")
        kinds = typing.get_type_hints(cls)
        for f, m in fields(cls):
            flags = [f"--{section}-" + f.name.replace("_", "-")]
            old = flat_name(section, f.name)
            if old and old.replace("_", "-") != flags[0][2:]:
                flags.append("--" + old.replace("_", "-"))
            shown = f" [{_shown(getattr(defaults.sections[section], f.name))}]"
            _flag(sub, f"{section}.{f.name}", flags, kinds[f.name], (m.help_text() + shown).strip())


IGNORED_KEYS = {
    "command",
    "config",
    "config_json",
    "preset",
    "print_config",
    "func",
    "progress",
    "heatmap",
    "resume",
    "fresh",
    "keep_checkpoint",
    "quiet",
    "on_divergence",
    "verbose",
    "tensorboard",
    "grid",
    "jobs",
    "report",
    "target",
    "runs",
}


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return nest_dotted({k: v for k, v in vars(ns).items() if k not in IGNORED_KEYS})


def _config(ns: argparse.Namespace, file_values: dict[str, Any] | None = None) -> RunConfig:
    """The run's settings: the defaults, the --config file (``file_values``: its contents,
    when already read), then the flags."""
    if getattr(ns, "config_json", None):  # used by `fedftg sweep` for its child runs
        return config_from_dict(json.loads(ns.config_json))
    file = getattr(ns, "config", None)
    sources = [file_source(file, file_values)] if file else []
    return settings_from([*sources, Source(_overrides(ns))])


def _configs(ns: argparse.Namespace) -> list[RunConfig]:
    """The runs a `run` command asks for: one, or one per group of a preset."""
    if not getattr(ns, "preset", None):
        return [_config(ns)]
    from fedftg.presets import load_preset, preset_runs

    if getattr(ns, "config", None):
        raise UserError(
            "preset: --preset and --config cannot be combined (flags override a preset)"
        )
    overrides = _overrides(ns)
    out = overrides.pop("out", None)
    return [cfg for _, cfg in preset_runs(load_preset(ns.preset), overrides, out)]


def cmd_presets(ns: argparse.Namespace) -> int:
    from fedftg.presets import available

    for name, description in available().items():
        print(f"{name:<22} {description}")
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    from fedftg.config import load_config_file
    from fedftg.engine.sweep import (
        grid_points,
        parse_grid,
        point_line,
        point_out,
        run_sweep,
        threads_line,
    )

    values = load_config_file(ns.config) if ns.config else {}
    grid = parse_grid(values.pop("grid", {}))
    grid.update(parse_grid(ns.grid or []))
    bases = _configs(ns) if ns.preset else [_config(ns, values)]
    # each sweep's points, built once: bad grids and job counts are reported before torch loads
    sweeps = [(base, grid_points(base, grid)) for base in bases]
    if ns.print_config:
        shown = [{"point": name, **cfg.to_dict()} for _, points in sweeps for name, cfg in points]
        print(json.dumps(shown, indent=2))
        return 0
    print(threads_line(bases[0], ns.jobs), flush=True)
    from fedftg.engine.rundir import TIME, claim_out, link_latest
    from fedftg.report.files import remove_empty_dirs

    def report(r: dict[str, Any]) -> None:
        print(point_line(r), flush=True)

    stamped, made, now = [], [], time.time()
    for base, points in sweeps:  # one directory per sweep, not per point
        if TIME not in base.out:
            continue
        # claimed now (created), so sweeps started in the same second never share one
        path, _, folders = claim_out(base.out, now)
        base.out = str(path)
        stamped.append(path)
        made += folders
        for name, cfg in points:
            cfg.out = point_out(base, name)
    try:
        results = [
            r
            for base, points in sweeps
            for r in run_sweep(base, points, jobs=ns.jobs, on_point=report)
        ]
    except BaseException:  # stopped or failed before a point wrote anything: no empty folders
        remove_empty_dirs(made)
        raise
    for path in stamped:
        link_latest(path)
    cfg = bases[0]
    failed = [r for r in results if r["status"].startswith("failed")]
    if failed:
        sys.stderr.write(f"error: {len(failed)} run(s) failed; see {failed[0]['log']}\n")
        return 1
    if ns.report:
        from fedftg.report.report import build_report

        root = Path(cfg.out).parent if len(bases) > 1 else Path(cfg.out)
        md = build_report([str(root)], root / "report", target=ns.target)
        print(f"report written to {md}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from fedftg.report.report import build_report

    md = build_report(ns.runs, ns.out, target=ns.target)
    print(f"report written to {md}")
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    configs = _configs(ns)
    if ns.print_config:
        shown = [c.to_dict() for c in configs]
        print(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2))
        return 0
    from fedftg.threads import apply_threads, other_running, plan_threads, usable_cores

    # before the engine loads torch: OpenMP reads its wait policy once, as torch loads
    plan = plan_threads(usable_cores(), 1, configs[0].threads, os.environ, other_running())
    apply_threads(plan)
    from fedftg.engine.run import Diverged, Interrupted, run_experiment

    verbosity = 0 if ns.quiet else 2 if ns.verbose else 1
    for cfg in configs:
        try:
            run_experiment(
                cfg,
                progress=ns.progress,
                resume=ns.resume,
                fresh=ns.fresh,
                keep_checkpoint=ns.keep_checkpoint,
                verbosity=verbosity,
                tensorboard=ns.tensorboard,
                on_divergence=ns.on_divergence,
            )
        except Interrupted as exc:
            sys.stderr.write(f"interrupted: {exc}\n")
            return 128 + exc.signum  # 130 after SIGINT, 143 after SIGTERM
        except Diverged as exc:
            sys.stderr.write(f"error: {exc}; outputs written to {cfg.out}\n")
            from fedftg.engine.sweep import EXIT_DIVERGED

            return EXIT_DIVERGED
    return 0


def cmd_partition(ns: argparse.Namespace) -> int:
    cfg = _config(ns)  # first: bad settings are reported without loading torch
    from fedftg.data.partition import format_partition_table, partition_label, partition_stats
    from fedftg.engine.setup import prepare
    from fedftg.report.heatmap import save_partition_heatmap

    setup = prepare(cfg)
    print(format_partition_table(setup.partition))
    stats = partition_stats(setup.partition)
    print(", ".join(f"{k}: {_fmt(v)}" for k, v in stats.items() if not isinstance(v, list)))
    path = ns.heatmap
    save_partition_heatmap(
        setup.partition.counts,
        path,
        class_names=list(setup.dataset.classes),
        title=f"{cfg.dataset}: {cfg.clients} clients, {partition_label(vars(cfg))}",
    )
    print(f"heatmap written to {path}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from fedftg.bench import BenchSettings, run_bench

    settings = BenchSettings(
        command=ns.benchmark,
        model=ns.model,
        dataset=ns.dataset,
        clients=ns.clients,
        samples_per_client=ns.samples_per_client,
        local_epochs=ns.local_epochs,
        batch_size=ns.batch_size,
        device=ns.device,
        precision=ns.precision,
        repeats=ns.repeats,
        test_samples=ns.test_samples,
        reference=ns.reference,
    )
    print(json.dumps(run_bench(settings)))
    return 0


def _add_bench_parser(subs: Any) -> None:
    bench = subs.add_parser(
        "bench",
        help="time the fast path against the reference path; one JSON object on stdout",
    )
    bench.add_argument(
        "benchmark",
        choices=("ftg-step", "round"),
        metavar="{ftg-step,round}",
        help="ftg-step: one FedFTG server step; round: one fedavg+ftg round",
    )
    bench.add_argument("--model", default="resnet18", help=f"{MODELS.help_text()} [resnet18]")
    bench.add_argument(
        "--dataset",
        default="cifar10",
        help=f"{', '.join(shaped_datasets())}: only its shape and class count are "
        "used, the inputs are random [cifar10]",
    )
    ints = {
        "clients": (10, "clients K, all taking part"),
        "samples_per_client": (500, "training samples per client"),
        "local_epochs": (5, "local epochs (round)"),
        "batch_size": (50, "local batch and generated batch B"),
        "repeats": (3, "timed repeats after one warm-up; medians are reported"),
        "test_samples": (10_000, "test samples evaluated (round)"),
    }
    for name, (default, text) in ints.items():
        flag = "--" + name.replace("_", "-")
        bench.add_argument(flag, type=int, default=default, metavar="N", help=f"{text} [{default}]")
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N [cpu]")
    bench.add_argument("--precision", default="fp32", help="fp32 or bf16 [fp32]")
    bench.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="time the fast path only",
    )
    bench.set_defaults(func=cmd_bench)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedftg", description=__doc__.splitlines()[0])
    from fedftg import __version__

    parser.add_argument("--version", action="version", version=f"fedftg {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = subs.add_parser("run", help="run FL methods and write results to --out")
    run.add_argument("--config", metavar="FILE", help="TOML file of settings (flags override)")
    _add_preset_flag(run)
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the fully resolved settings as JSON (a list for a preset's runs) and exit",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr [on when stderr is a terminal]",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out, also to more --rounds than it had (a finished run "
        "is extended); rerunning the same command also continues",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="replace the run in --out (its files are deleted) instead of continuing it",
    )
    run.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep the full final checkpoint (every client's state) instead of the small one",
    )
    run.add_argument(
        "--quiet", action="store_true", help="print nothing but errors (no progress either)"
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="one line per round on stderr, also on a terminal (default there: a bar)",
    )
    run.add_argument(
        "--on-divergence",
        choices=("stop", "continue"),
        default="stop",
        help="a method whose model or loss becomes NaN/Inf: stop the run (exit 3) or record "
        "status 'diverged' in summary.json and go on with the other methods [stop]",
    )
    run.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard scalars to --out"
    )
    run.add_argument("--config-json", help=argparse.SUPPRESS)
    _add_config_flags(run)
    run.set_defaults(func=cmd_run)

    sweep = subs.add_parser(
        "sweep", help="a grid of runs (e.g. alpha x seed), skipping finished ones"
    )
    sweep.add_argument("--config", metavar="FILE", help="TOML settings; a [grid] table sweeps")
    _add_preset_flag(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        metavar="FIELD=V1,V2",
        help="values to sweep, e.g. --grid alpha=0.1,0.5 --grid seed=0,1,2 (repeatable)",
    )
    sweep.add_argument("--jobs", type=int, default=1, help="runs in parallel processes [1]")
    sweep.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings of every grid point as a JSON list and exit (runs nothing)",
    )
    sweep.add_argument("--report", action="store_true", help="write OUT/report when done")
    sweep.add_argument("--target", type=float, default=0.8, help="target accuracy [0.8]")
    _add_config_flags(sweep)
    sweep.set_defaults(func=cmd_sweep)

    rep = subs.add_parser("report", help="tables and figures over run directories")
    rep.add_argument("runs", nargs="+", help="run directories (searched recursively)")
    rep.add_argument("--out", default="report", help="output folder [report]")
    rep.add_argument(
        "--target", type=float, default=0.8, help="accuracy for 'rounds to target' [0.8]"
    )
    rep.set_defaults(func=cmd_report)

    part = subs.add_parser("partition", help="print per-client statistics, write a heatmap")
    part.add_argument("--config", metavar="FILE", help="TOML file of settings (flags override)")
    part.add_argument("--heatmap", default="partition.png", help="PNG path [partition.png]")
    _add_config_flags(part)
    part.set_defaults(func=cmd_partition)

    _add_bench_parser(subs)
    presets = subs.add_parser("presets", help="list the shipped experiment presets")
    presets.set_defaults(func=cmd_presets)
    return parser


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="a shipped protocol (fedftg presets lists them) or a preset .toml; flags "
        "override it; a preset with groups runs each group into OUT/<group>",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedftg` console command."""
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        status = ns.func(ns)
        sys.stdout.flush()  # inside the try: a reader that went away is not an error
        return status
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        sys.stderr.write("error: interrupted\n")
        return 128 + getattr(exc, "signum", 2)  # StopNow after a second SIGTERM: 143
    except BrokenPipeError:  # the reader went away (`fedftg ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

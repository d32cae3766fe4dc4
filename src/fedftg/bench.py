"""`fedftg bench`: the fast path against the simple reference path, timed in one process.

Two units of work, each run both ways on the same seeded inputs:

* ``ftg-step``: one FedFTG server step (`FTGServer.step`), ``ftg.impl`` fast vs reference.
* ``round``: one full ``fedavg+ftg`` round through the engine (`MethodRunner.run_round`:
  local training of every client, aggregation, server step, test evaluation), fast =
  ``client_batching=auto`` + ``ftg.impl=fast``, reference = ``sequential`` + ``reference``.

Inputs are synthetic (random uint8 images of the dataset's shape, random labels): only the
shapes and the class count of ``--dataset`` matter. Each path runs once untimed (warm-up),
then ``repeats`` timed times; medians are reported, the fast path's first. FLOPs are
counted with `FlopCounterMode` in an untimed pass (see `units`), and set against a dense
matmul rate measured in the same process. The result is one JSON-ready dict.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedftg.config import PRECISIONS, RunConfig
from fedftg.data.sources import Dataset, shaped_datasets
from fedftg.engine.inprocess import MethodRunner
from fedftg.engine.setup import Setup, resolve_device, server_plugin, setup_from_dataset
from fedftg.errors import UserError
from fedftg.fl.aggregation import State, weighted_average
from fedftg.fl.client import detached_state
from fedftg.models import MODELS
from fedftg.plugins.ftg import FTGServer
from fedftg.plugins.specs.ftg import FTGSettings
from fedftg.seeding import numpy_rng, torch_rng

COMMANDS = ("ftg-step", "round")
TEACHER_NOISE = 0.01  # std of the per-client perturbation of the shared init (ftg-step)

# A timed unit of work: returns (seconds, the parameters of the model it produced).
Unit = Callable[[], tuple[float, State]]


@dataclass(frozen=True)
class BenchSettings:
    """What `fedftg bench` measures; defaults are the authors' CIFAR-10 setting."""

    command: str
    model: str = "resnet18"
    dataset: str = "cifar10"
    clients: int = 10
    samples_per_client: int = 500
    local_epochs: int = 5
    batch_size: int = 50
    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 3
    test_samples: int = 10_000
    reference: bool = True
    seed: int = 0

    def run_config(self, fast: bool) -> RunConfig:
        """The engine config of the fast or the reference path (validated).

        ``batch_size`` is both the local batch and FedFTG's generated batch B; the FTG
        schedule is the default one (I = 10, I_g = 1, I_d = 5).
        """
        cfg = RunConfig(
            dataset=self.dataset,
            clients=self.clients,
            samples_per_client=self.samples_per_client,
            participation=1.0,
            rounds=1 + self.repeats,
            model=self.model,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            method=["fedavg+ftg"],
            device=self.device,
            precision=self.precision,
            client_batching="auto" if fast else "sequential",
            seed=self.seed,
        )
        cfg.ftg = FTGSettings(batch_size=self.batch_size, impl="fast" if fast else "reference")
        return cfg.validate()

    def validate(self) -> BenchSettings:
        """Raise `UserError` naming the first bad setting; returns self."""
        if self.command not in COMMANDS:
            raise UserError(
                f"bench: unknown benchmark {self.command!r}; use {' or '.join(COMMANDS)}"
            )
        shapes = shaped_datasets()  # channels, image size, classes: all the bench takes
        if self.dataset not in shapes:
            valid = ", ".join(shapes)
            raise UserError(f"dataset: unknown value {self.dataset!r}; use one of {valid}")
        MODELS.get(self.model)  # an unknown model is a UserError listing the known ones
        if self.precision not in PRECISIONS:
            raise UserError(f"precision: unknown value {self.precision!r}; use fp32 or bf16")
        for name in ("repeats", "test_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.batch_size < 2:
            raise UserError(f"batch_size: must be >= 2 (BatchNorm), got {self.batch_size}")
        self.run_config(fast=True)
        resolve_device(self.device)
        return self


# ------------------------------------------------------------------------ inputs


def synthetic_dataset(s: BenchSettings) -> Dataset:
    """Random uint8 images of the dataset's shape with random labels (seeded).

    clients * samples_per_client training samples (all of them are dealt out) and
    ``test_samples`` test samples.
    """
    channels, size, classes = shaped_datasets()[s.dataset]
    rng = numpy_rng(s.seed, "bench", "data")
    n_train = s.clients * s.samples_per_client

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)

    def labels(n: int) -> np.ndarray:
        return rng.integers(0, classes, n, dtype=np.int64)

    return Dataset(
        name=s.dataset,
        train_x=images(n_train),
        train_y=labels(n_train),
        test_x=images(s.test_samples),
        test_y=labels(s.test_samples),
        classes=tuple(str(c) for c in range(classes)),
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def make_teachers(setup: Setup) -> tuple[list[nn.Module], nn.Module]:
    """K client models (the shared init, perturbed per client, seeded) in eval mode, and
    the student: their average weighted by client size, as FedAvg would give."""
    cfg = setup.cfg
    teachers = []
    for k in range(cfg.clients):
        net = setup.new_model()
        gen = torch_rng(cfg.seed, "bench", "teacher", k)
        with torch.no_grad():
            for p in net.parameters():
                noise = torch.randn(p.shape, generator=gen) * TEACHER_NOISE
                p.add_(noise.to(p.device))
        teachers.append(net.eval())
    sizes = setup.partition.counts.sum(axis=1)
    student = setup.new_model()
    student.load_state_dict(weighted_average([detached_state(t) for t in teachers], sizes))
    return teachers, student


# ------------------------------------------------------------------ measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, with the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """Fill ``out`` with ``peak_mem_mb`` and ``peak_mem_kind`` for the enclosed code.

    CUDA: `torch.cuda.max_memory_allocated` (reset on entry). CPU: the peak resident set
    size of the process, sampled every 5 ms from /proc/self/statm (where there is no
    /proc: the process's lifetime peak from getrusage).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_kind"] = "cuda_max_memory_allocated"
        return
    if not os.path.exists("/proc/self/statm"):
        yield
        scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB elsewhere
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        out["peak_mem_kind"] = "cpu_maxrss_process_lifetime"
        return
    peak = [_rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    out["peak_mem_mb"] = max(peak[0], _rss_bytes()) / 2**20
    out["peak_mem_kind"] = "cpu_peak_rss_sampled"


def matmul_gflops(device: torch.device, precision: str, repeats: int = 5) -> float:
    """The device's dense matmul rate (GFLOP/s, median of ``repeats``) at ``precision``:
    square matmuls of 2048 on CPU, 8192 on CUDA, after two warm-up products."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    seconds = [timed(lambda: a @ b, device) for _ in range(repeats)]
    return 2 * n**3 / statistics.median(seconds) / 1e9


def _params(model: nn.Module) -> State:
    return {k: p.detach().float().cpu().clone() for k, p in model.named_parameters()}


def max_abs_diff(a: State, b: State) -> float:
    """Largest absolute difference over all entries of two parameter dicts."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------ units


def ftg_step_unit(setup: Setup, teachers: list[nn.Module], student: nn.Module) -> Unit:
    """One `FTGServer.step` (round 0) as ``setup.cfg`` configures it (impl, precision), each
    call on a fresh copy of the student with a freshly seeded generator and random stream."""
    cfg, dev = setup.cfg, setup.device
    counts = setup.partition.counts

    def run() -> tuple[float, State]:
        net = copy.deepcopy(student)
        server = server_plugin(cfg, "ftg", setup.dataset, dev)
        if not isinstance(server, FTGServer):  # its step also takes the teachers as a list
            raise TypeError(f"the ftg plug-in built {type(server).__name__}, not FTGServer")
        gen = torch_rng(cfg.seed, "server", 0, device=dev)
        seconds = timed(lambda: server.step(net, teachers, counts, 0, gen), dev)
        return seconds, _params(net)

    return run


def round_unit(setup: Setup) -> Unit:
    """Successive ``fedavg+ftg`` rounds of one `MethodRunner` (round 0 is the warm-up)."""
    runner = MethodRunner(setup, "fedavg", "ftg")

    def run() -> tuple[float, State]:
        seconds = timed(runner.run_round, setup.device)
        return seconds, _params(runner.model)

    return run


@dataclass
class Units:
    """What one benchmark runs: the fast and reference units, a separate FLOP-counting unit
    (None: the fast path's warm-up is counted) and the samples one unit processes."""

    fast: Unit
    reference: Unit | None
    count: Unit | None
    samples: int


def units(s: BenchSettings) -> Units:
    """The units of benchmark ``s`` on one shared synthetic setup.

    FLOPs are the useful work: for a round whose fast path trains the clients with vmap
    (``client_batching=auto`` on CUDA), the count comes from a separate round with the
    clients in sequence, since vmap's convolution-backward batching rule executes (and
    `FlopCounterMode` counts) several times the per-client work.
    """
    fast_cfg = s.run_config(fast=True)
    setup = setup_from_dataset(fast_cfg, synthetic_dataset(s))
    ref_setup = dataclasses.replace(setup, cfg=s.run_config(fast=False))
    ftg = fast_cfg.ftg
    if s.command == "ftg-step":
        teachers, student = make_teachers(setup)
        return Units(
            fast=ftg_step_unit(setup, teachers, student),
            reference=ftg_step_unit(ref_setup, teachers, student) if s.reference else None,
            count=None,
            samples=ftg.iterations
            * ftg.batch_size
            * (s.clients * ftg.gen_steps + ftg.student_steps),
        )
    vmapped = setup.device.type == "cuda"  # what client_batching=auto picks
    count_cfg = dataclasses.replace(fast_cfg, client_batching="sequential")
    return Units(
        fast=round_unit(setup),
        reference=round_unit(ref_setup) if s.reference else None,
        count=round_unit(dataclasses.replace(setup, cfg=count_cfg)) if vmapped else None,
        samples=s.clients * s.samples_per_client * s.local_epochs,
    )


def samples_meaning(command: str) -> str:
    if command == "ftg-step":
        return "generated samples through the server step: I*B*(K*I_g + I_d) per step"
    return "local training samples: clients*samples_per_client*local_epochs per round"


# ------------------------------------------------------------------ environment


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (else `platform.processor`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, threads and date (and TF32 switches on CUDA) for the JSON."""
    env = {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_conv"] = torch.backends.cudnn.allow_tf32
    return env


def count_flops(unit: Unit) -> tuple[int, State]:
    """FLOPs of one (untimed) run of ``unit`` by `FlopCounterMode`, and its parameters."""
    with FlopCounterMode(display=False) as counter:
        _, params = unit()
    return counter.get_total_flops(), params


# ------------------------------------------------------------------------- main


def run_bench(s: BenchSettings) -> dict[str, Any]:
    """Run benchmark ``s`` and return its JSON-ready result (see the module docstring)."""
    s.validate()
    device = resolve_device(s.device)
    ftg = s.run_config(fast=True).ftg
    result: dict[str, Any] = {
        "command": s.command,
        **{k: v for k, v in dataclasses.asdict(s).items() if k != "command"},
        "ftg_iterations": ftg.iterations,
        "ftg_gen_steps": ftg.gen_steps,
        "ftg_student_steps": ftg.student_steps,
        "ftg_batch_size": ftg.batch_size,
    }
    u = units(s)
    fast, ref = u.fast, u.reference
    flops, fast_state = count_flops(u.count or fast)  # the fast warm-up, where it counts
    if u.count is not None:
        _, fast_state = fast()  # warm-up
    with peak_memory(device, result):
        fast_times = [fast()[0] for _ in range(s.repeats)]
    fast_s = statistics.median(fast_times)
    result.update(fast_s=fast_s, fast_times_s=fast_times)
    if ref is not None:
        _, ref_state = ref()  # warm-up
        ref_times = [ref()[0] for _ in range(s.repeats)]
        ref_s = statistics.median(ref_times)
        result.update(
            reference_s=ref_s,
            reference_times_s=ref_times,
            speedup=ref_s / fast_s,
            max_abs_diff=max_abs_diff(fast_state, ref_state),
        )
    matmul = matmul_gflops(device, s.precision)
    achieved = flops / fast_s / 1e9
    counted = "a separate round, clients in sequence" if u.count else "the fast warm-up run"
    result.update(
        samples_per_unit=u.samples,
        samples_per_s=u.samples / fast_s,
        samples_meaning=samples_meaning(s.command),
        flops=flops,
        achieved_gflops=achieved,
        matmul_gflops=matmul,
        flops_fraction=achieved / matmul,
        flops_counted=f"FlopCounterMode over {counted}",
        **environment(device),
    )
    return result

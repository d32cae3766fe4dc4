"""`fedftg bench`: one JSON object on stdout; bad input is one `error:` line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import _run

TINY = [
    "--model",
    "cnn",
    "--dataset",
    "digits",
    "--clients",
    "2",
    "--samples-per-client",
    "20",
    "--local-epochs",
    "1",
    "--batch-size",
    "4",
    "--test-samples",
    "50",
    "--repeats",
    "1",
]
FIELDS = (
    "command",
    "fast_s",
    "samples_per_s",
    "peak_mem_mb",
    "peak_mem_kind",
    "flops",
    "achieved_gflops",
    "matmul_gflops",
    "flops_fraction",
    "device_name",
    "torch",
    "threads",
    "date",
    "model",
    "dataset",
    "clients",
    "samples_per_client",
    "local_epochs",
    "batch_size",
    "device",
    "precision",
    "repeats",
)
REFERENCE_FIELDS = ("reference_s", "speedup", "max_abs_diff")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the benchmarks stay fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", ["ftg-step", "round"])
def test_bench_prints_one_json_object(capsys, command):
    code, out, _ = _run(capsys, ["bench", command, *TINY])
    assert code == 0
    (line,) = out.splitlines()
    result = json.loads(line)
    assert result["command"] == command
    for key in FIELDS + REFERENCE_FIELDS:
        assert key in result, key
    assert result["speedup"] == pytest.approx(result["reference_s"] / result["fast_s"])
    assert result["flops"] > 0 and result["flops_fraction"] > 0
    assert result["samples_per_s"] == pytest.approx(result["samples_per_unit"] / result["fast_s"])
    assert result["max_abs_diff"] < 1e-3  # fast and reference paths compute the same maths
    assert len(result["fast_times_s"]) == 1 and result["peak_mem_mb"] > 0


def test_bench_no_reference_times_the_fast_path_only(capsys):
    code, out, _ = _run(capsys, ["bench", "ftg-step", *TINY, "--no-reference"])
    assert code == 0
    result = json.loads(out)
    assert result["reference"] is False and result["fast_s"] > 0
    for key in REFERENCE_FIELDS:
        assert key not in result


BAD = [
    ["bench"],
    ["bench", "epoch"],
    ["bench", "round", "--clients", "0"],
    ["bench", "round", "--clients", "two"],
    ["bench", "round", "--samples-per-client", "-5"],
    ["bench", "round", "--repeats", "0"],
    ["bench", "round", "--batch-size", "1"],
    ["bench", "round", "--model", "vgg"],
    ["bench", "ftg-step", "--dataset", "imagenet"],
    ["bench", "ftg-step", "--dataset", "imagefolder"],
    ["bench", "ftg-step", "--precision", "fp16"],
    ["bench", "ftg-step", "--device", "tpu"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a[1:]) or "missing")
def test_bench_bad_input_is_one_error_line(capsys, args):
    code, out, err = _run(capsys, args)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_cuda_unavailable_is_an_error(capsys):
    code, _, err = _run(capsys, ["bench", "round", "--device", "cuda"])
    assert code == 2 and err.startswith("error: device:") and "CUDA" in err

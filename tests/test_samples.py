"""The generated-sample grids: one per method (no shared samples.png), titled with the
method, round and dataset, with the measured within-class spread, in the run and the report."""

from __future__ import annotations

import numpy as np

from clirun import run_cli as _run
from fedftg.engine import rundir
from fedftg.report.plots import COLLAPSE_RATIO, sample_figure, spread_note
from fedftg.report.report import build_report

FAST = ["--rounds", "2", "--clients", "3", "--local-epochs", "1", "--participation", "1"]
FAST += ["--local-steps", "2", "--ftg-iterations", "1", "--ftg-student-steps", "1"]


def test_spread_note_says_when_the_generator_has_collapsed():
    assert spread_note(0.11, 0.44, "digits") == (
        "within-class spread 0.110 (real digits images: 0.440, 25 %)"
    )
    collapsed = spread_note(0.02, 0.44, "digits")
    assert collapsed == (
        "within-class spread 0.020 (real digits images: 0.440, 5 %): the generator has "
        "collapsed to about one image per class"
    )
    edge = COLLAPSE_RATIO * 0.44
    assert "collapsed" not in spread_note(edge, 0.44, "digits")
    assert "collapsed" in spread_note(edge * 0.99, 0.44, "digits")
    assert spread_note(0.3, None, "x") == "within-class spread 0.300"
    assert "not measured" in spread_note(None, 0.44, "x")


def test_the_figure_carries_the_title_and_the_spread_line():
    images = np.zeros((4, 1, 8, 8))
    fig = sample_figure(images, np.array([0, 0, 1, 1]), ["a", "b"], "m, round 3, d", "spread x")
    assert fig._suptitle.get_text() == "m, round 3, d\nspread x"


def test_each_method_gets_its_own_titled_grid_and_the_report_shows_them(
    tmp_path, capsys, monkeypatch
):
    seen = {}
    real = rundir.plot_samples

    def spy(images, labels, classes, path, title="", note=""):
        seen[path.name] = (title, note, images.shape)
        return real(images, labels, classes, path, title, note)

    monkeypatch.setattr(rundir, "plot_samples", spy)
    out = tmp_path / "r"
    args = ["run", *FAST, "--method", "fedavg,fedavg+ftg,scaffold+ftg", "--out", str(out)]
    assert _run(capsys, args)[0] == 0
    assert sorted(seen) == ["samples_fedavg_ftg.png", "samples_scaffold_ftg.png"]
    title, note, shape = seen["samples_fedavg_ftg.png"]
    assert title == "fedavg+ftg, round 2, digits" and shape == (80, 1, 8, 8)
    assert note.startswith("within-class spread ") and "(real digits images: " in note
    assert seen["samples_scaffold_ftg.png"][0] == "scaffold+ftg, round 2, digits"
    assert not (out / "samples.png").exists()
    grids = [(out / n).read_bytes() for n in seen]
    assert grids[0] != grids[1] and all(g[:4] == b"\x89PNG" for g in grids)
    md = build_report([str(out)], tmp_path / "report").read_text()
    assert "![generated samples: fedavg_ftg (first seed)](samples_fedavg_ftg_0.png)" in md
    assert "![generated samples: scaffold_ftg (first seed)](samples_scaffold_ftg_0.png)" in md
    assert (tmp_path / "report" / "samples_fedavg_ftg_0.png").exists()


def test_the_report_still_shows_the_samples_png_of_an_older_run(tmp_path, capsys):
    out = tmp_path / "old"
    assert _run(capsys, ["run", *FAST, "--method", "fedftg", "--out", str(out)])[0] == 0
    (out / "samples_fedftg.png").rename(out / "samples.png")  # as runs wrote it before
    md = build_report([str(out)], tmp_path / "report").read_text()
    assert "![generated samples (first seed)](samples_0.png)" in md

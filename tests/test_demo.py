"""`opdiff demo --quick`: the whole pipeline on the shipped digits teacher, end to end, through the CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.backbones import load_backbone
from operator_diffusion.demo import DIGITS_TEACHER, check_demo_out, digits_teacher
from operator_diffusion.fid import DIGITS_FEATURENET, DIGITS_STATS, FeatureNetExtractor, FeatureStats, stats_of_images
from operator_diffusion.images import load_images, read_image_folder


def test_the_shipped_assets_load_and_agree():
    teacher = digits_teacher()
    assert teacher.image_shape == (1, 8, 8)
    assert (
        teacher.config() == load_backbone("opdiff-unet", preset="digits", prediction="eps").config()
    )  # the preset's network
    assert DIGITS_TEACHER.stat().st_size < 5 * 2**20  # "a few MB at most"
    stats = FeatureStats.load(DIGITS_STATS)
    again = stats_of_images(load_images("digits"), FeatureNetExtractor(DIGITS_FEATURENET))
    assert stats.extractor == again.extractor and stats.n == 1797
    np.testing.assert_allclose(stats.mu, again.mu, rtol=1e-6, atol=1e-8)


def test_quick_demo_runs_the_pipeline_and_reports(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for image in ("side_by_side.png", "trajectories/trajectories.png", "spectrum/spectrum.png"):
        assert (out / image).is_file() and image in report
    rows = {(row["method"], row["nfe"]): row for row in json.loads((out / "bench.json").read_text())["rows"]}
    dsno, base, denoiser = rows[("DSNO", 1)], rows[("one-step baseline", 1)], rows[("teacher x̂₀(x_T)", 1)]
    reference = rows[("teacher reference", 21)]
    # even a short distillation learns: both one-step students are closer to the teacher than its one-shot
    # denoiser, and the teacher's own samples are far closer to the digits (FID) than that denoiser's blur
    assert dsno["rmse"] < denoiser["rmse"] and base["rmse"] < denoiser["rmse"]
    assert reference["fid"] < 0.5 * denoiser["fid"]
    assert rows[("ddim", 10)]["rmse"] < rows[("ddim", 2)]["rmse"]
    assert len(read_image_folder(out / "samples")) == 16
    check_demo_out(out)  # a demo's own folder may be run again (resumed); a folder of anything else is refused

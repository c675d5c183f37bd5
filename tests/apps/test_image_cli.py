"""The image experiment end to end: the smoke preset through ``sweep``, ``train`` and ``report``."""

from __future__ import annotations

import json

import pytest
import torch

from declnet.apps.image import preset_config, train
from declnet.apps.image.__main__ import main


def _has_lp_projection() -> bool:
    try:
        from declnet.layers import LpProjection  # noqa: F401
    except ImportError:
        return False
    return True


# With the projection layer available the smoke sweep covers a sphere and a ball too.
SMOKE_PROJECTIONS = ["none", "l2_ball", "l1_sphere"] if _has_lp_projection() else ["none"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_sweep_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--preset", "smoke", "--projections", *SMOKE_PROJECTIONS]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| Model | Radius | Top-1 % | Top-5 % | mAP ×100 |" in printed
    for name in SMOKE_PROJECTIONS:
        run = out / name
        result = json.loads((run / "result.json").read_text())
        assert result["projection"] == name and result["epochs"] == 1
        assert 0 <= result["top1"] <= result["top5"] <= 1 and 0 < result["map"] <= 1
        assert result["forward_us"] > 0 and result["backward_us"] > 0
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
        assert (run / "checkpoint.pt").is_file()
    report = (out / "report.md").read_text()
    assert report.count("| ResNet-18") == len(SMOKE_PROJECTIONS)
    # A second sweep keeps the finished runs; report re-reads the folder.
    before = (out / "none" / "result.json").read_text()
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert (out / "none" / "result.json").read_text() == before
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out == report


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    config = preset_config("smoke", epochs=2)
    straight = train(config, tmp_path / "straight", progress=False, log=lambda line: None)
    train(config.replace(epochs=1), tmp_path / "resumed", progress=False, log=lambda _: None)
    # An epoch logged but not checkpointed (interrupted while saving) is dropped on resuming.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 2, "unsaved": True}) + "\n")
    resumed = train(
        config, tmp_path / "resumed", resume=True, progress=False, log=lambda line: None
    )
    for key in ("top1", "top5", "map", "train_loss", "val_loss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-6)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert "unsaved" not in lines[1]


def test_resume_refuses_another_configuration(tmp_path):
    train(preset_config("smoke"), tmp_path, progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="width: 2 there, 4 now"):
        train(preset_config("smoke", width=4), tmp_path, resume=True, progress=False)


def test_missing_data_gets_a_helpful_error(tmp_path, capsys):
    root = tmp_path / "nowhere"
    args = ["train", "--dataset", "fashion_mnist", "--data-root", str(root), "--out"]
    assert main([*args, str(tmp_path / "run"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert str(root) in error and "apt-get install dataset-fashion-mnist" in error


def test_bad_options_are_reported(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--width", "0", "--out", str(tmp_path)]) == 2
    assert "width must be positive" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_radius_for_several_norms_is_refused(tmp_path, capsys):
    args = ["sweep", "--preset", "smoke", "--radius", "3", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--radius-scale" in capsys.readouterr().err


@pytest.mark.skipif(not _has_lp_projection(), reason="needs declnet.layers.LpProjection")
def test_radius_scale_multiplies_the_default_radius(tmp_path):
    from declnet.apps.image import default_radius

    config = preset_config("smoke", projection="l2_ball", radius_scale=2.0)
    result = train(config, tmp_path, progress=False, log=lambda line: None)
    assert result["radius"] == pytest.approx(2 * default_radius("l2_ball", 16))

"""Tests of the point-cloud experiment: data, outliers, metrics, model, training, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from declnet.apps._metrics import average_precision
from declnet.apps.pointcloud import (
    SYNTHETIC_CLASSES,
    PointNet,
    RunConfig,
    generate_synthetic,
    inject_outliers,
    mean_average_precision,
    run_training,
    top1_accuracy,
)
from declnet.apps.pointcloud.cli import main
from declnet.apps.pointcloud.config import PRESETS, SweepConfig, apply_preset
from declnet.apps.pointcloud.data import (
    PointCloudSet,
    export_h5,
    load_dataset,
    load_modelnet40_h5,
    load_modelnet40_off,
    read_off,
)
from declnet.apps.pointcloud.outliers import num_outliers

# ------------------------------------------------------------------------------ loaders


def _write_h5(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=labels)


def test_h5_loader_reads_uint8_labels_of_shape_n_by_1(tmp_path):
    rng = np.random.default_rng(0)
    names = ["airplane", "bathtub", "bed"]
    (tmp_path / "shape_names.txt").write_text("\n".join(names) + "\n")
    train0 = rng.normal(size=(5, 16, 3)).astype(np.float32)
    train1 = rng.normal(size=(2, 16, 3)).astype(np.float32)
    test0 = rng.normal(size=(3, 16, 3)).astype(np.float32)
    labels0 = np.array([[0], [1], [2], [1], [0]], np.uint8)
    _write_h5(tmp_path / "ply_data_train0.h5", train0, labels0)
    _write_h5(tmp_path / "ply_data_train1.h5", train1, np.array([[2], [2]], np.uint8))
    _write_h5(tmp_path / "ply_data_test0.h5", test0, np.array([[1], [0], [2]], np.uint8))

    train, test = load_modelnet40_h5(tmp_path, num_points=8)

    assert train.points.shape == (7, 8, 3) and train.points.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.labels.shape == (7,)
    assert train.labels.tolist() == [0, 1, 2, 1, 0, 2, 2]
    assert test.labels.tolist() == [1, 0, 2]
    assert train.class_names == names
    torch.testing.assert_close(train.points[5:], torch.from_numpy(train1[:, :8]))


def test_h5_loader_errors_show_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5"):
        load_modelnet40_h5(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"shape_names\.txt"):
        load_modelnet40_h5(tmp_path)
    with pytest.raises(ValueError, match="needs --data-root"):
        load_dataset("modelnet40_h5", num_points=8)
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    _write_h5(tmp_path / "ply_data_train0.h5", np.zeros((2, 4, 3), np.float32), np.zeros((2, 1)))
    _write_h5(tmp_path / "ply_data_test0.h5", np.zeros((2, 4, 3), np.float32), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="fewer than the 8"):
        load_modelnet40_h5(tmp_path, num_points=8)


def test_synthetic_export_round_trips_through_the_h5_loader(tmp_path):
    train, test = load_dataset(
        "synthetic", num_points=16, num_classes=3, train_per_class=2, test_per_class=1
    )
    export_h5(train, test, tmp_path, chunk=4)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [
        "ply_data_test0.h5",
        "ply_data_train0.h5",
        "ply_data_train1.h5",
    ]
    with h5py.File(tmp_path / "ply_data_train0.h5") as f:
        assert f["label"].dtype == np.uint8 and f["label"].shape == (4, 1)
    train2, test2 = load_modelnet40_h5(tmp_path, num_points=16)
    torch.testing.assert_close(train2.points, train.points)
    assert train2.labels.tolist() == train.labels.tolist()
    assert test2.class_names == list(SYNTHETIC_CLASSES[:3])


_CUBE_VERTICES = "\n".join(f"{x} {y} {z}" for x in (0, 1) for y in (0, 1) for z in (0, 1))
_CUBE_QUADS = "4 0 1 3 2\n4 4 6 7 5\n4 0 4 5 1\n4 2 3 7 6\n4 0 2 6 4\n4 1 5 7 3"


def test_read_off_accepts_a_header_glued_to_the_counts(tmp_path):
    glued = tmp_path / "glued.off"
    glued.write_text(f"OFF8 6 0\n{_CUBE_VERTICES}\n{_CUBE_QUADS}\n")
    plain = tmp_path / "plain.off"
    plain.write_text(f"OFF\n# a comment\n\n8 6 0\n{_CUBE_VERTICES}\n{_CUBE_QUADS}\n")
    v1, t1 = read_off(glued)
    v2, t2 = read_off(plain)
    assert v1.shape == (8, 3) and t1.shape == (12, 3)  # quads become two triangles each
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(t1, t2)


def test_read_off_reads_triangle_meshes(tmp_path):
    path = tmp_path / "tetra.off"
    path.write_text("OFF\n4 4 6\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n")
    vertices, triangles = read_off(path)
    np.testing.assert_array_equal(vertices[3], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(triangles, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])


@pytest.mark.parametrize(
    "text, message",
    [
        ("PLY\n", "not an OFF"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "expected 3 vertices"),
        ("OFF3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "do not exist"),
    ],
)
def test_read_off_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "bad.off"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_off(path)


def _off_root(root: Path) -> None:
    for name in ("chair", "airplane"):
        for split, count in (("train", 2), ("test", 1)):
            folder = root / name / split
            folder.mkdir(parents=True)
            for i in range(count):
                header = "OFF8 6 0" if i == 0 else "OFF\n8 6 0"
                (folder / f"{name}_{split}_{i}.off").write_text(
                    f"{header}\n{_CUBE_VERTICES}\n{_CUBE_QUADS}\n"
                )


def test_off_loader_samples_labels_and_caches(tmp_path, monkeypatch):
    _off_root(tmp_path / "ModelNet40")
    cache = tmp_path / "cache"
    train, test = load_modelnet40_off(tmp_path / "ModelNet40", num_points=64, cache_dir=cache)
    assert train.class_names == ["airplane", "chair"]
    assert train.points.shape == (4, 64, 3) and test.points.shape == (2, 64, 3)
    assert train.labels.tolist() == [0, 0, 1, 1]
    norms = train.points.norm(dim=-1)
    assert float(norms.max()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(train.points.mean(dim=1), torch.zeros(4, 3), atol=1e-6, rtol=0)
    # Sampled from the surface of a cube: every point lies on a face of the bounding box.
    lo = train.points.amin(dim=1, keepdim=True)
    hi = train.points.amax(dim=1, keepdim=True)
    gap = torch.minimum((train.points - lo).abs(), (train.points - hi).abs()).amin(dim=-1)
    assert float(gap.max()) < 1e-5
    assert len(list(cache.glob("*.npz"))) == 1

    def fail(path):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("declnet.apps.pointcloud.data.read_off", fail)
    train2, _ = load_modelnet40_off(tmp_path / "ModelNet40", num_points=64, cache_dir=cache)
    torch.testing.assert_close(train2.points, train.points)


def test_off_loader_errors_show_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"train/airplane_0001.off"):
        load_modelnet40_off(tmp_path / "nowhere")
    (tmp_path / "chair" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no train meshes"):
        load_modelnet40_off(tmp_path)


def test_point_cloud_set_validates_shapes():
    with pytest.raises(ValueError, match=r"\(n, N, 3\)"):
        PointCloudSet(torch.zeros(2, 5, 2), torch.zeros(2, dtype=torch.int64), ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        PointCloudSet(torch.zeros(2, 5, 3), torch.tensor([0, 2]), ["a", "b"])


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_generator_is_deterministic_and_class_balanced():
    a = generate_synthetic(3, 64, num_classes=5, seed=7)
    b = generate_synthetic(3, 64, num_classes=5, seed=7)
    c = generate_synthetic(3, 64, num_classes=5, seed=8)
    test = generate_synthetic(3, 64, num_classes=5, seed=7, split="test")
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[0], c[0])
    assert not np.allclose(a[0], test[0])
    assert np.bincount(a[1]).tolist() == [3] * 5
    assert a[2] == list(SYNTHETIC_CLASSES[:5])
    assert a[0].shape == (15, 64, 3) and a[0].dtype == np.float32


def test_synthetic_clouds_are_centred_in_the_unit_ball_and_diverse():
    points, _, _ = generate_synthetic(2, 256, seed=0)
    norms = np.linalg.norm(points, axis=-1)
    np.testing.assert_allclose(norms.max(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(points.mean(axis=1), 0.0, atol=1e-5)
    # Objects of one class differ (random proportions and pose).
    assert not np.allclose(points[0], points[1])
    assert len(SYNTHETIC_CLASSES) >= 10


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        generate_synthetic(1, 8, num_classes=99)
    with pytest.raises(ValueError, match="split"):
        generate_synthetic(1, 8, split="val")


# ------------------------------------------------------------------------------ outliers


def test_outlier_injection_replaces_the_right_number_of_points_inside_the_unit_ball():
    points = torch.full((50, 200, 3), 5.0)  # far outside the unit ball: outliers stand out
    out = inject_outliers(points, 0.3, seed=1)
    replaced = (out != 5.0).all(dim=-1)
    assert replaced.sum(dim=1).tolist() == [60] * 50
    assert float(out[replaced].norm(dim=-1).max()) <= 1.0
    assert torch.equal(out, inject_outliers(points, 0.3, seed=1))
    assert not torch.equal(out, inject_outliers(points, 0.3, seed=2))
    assert torch.equal(points, torch.full((50, 200, 3), 5.0))  # input untouched
    assert inject_outliers(points, 0.0, seed=1) is points


def test_outliers_are_uniform_in_the_ball():
    out = inject_outliers(torch.zeros(1, 20000, 3), 1.0, seed=0)[0]
    radius = out.norm(dim=-1)
    # Uniform in the ball: r^3 is uniform on [0, 1]; directions are isotropic.
    assert float((radius**3).mean()) == pytest.approx(0.5, abs=0.01)
    assert float((radius**3 < 0.25).double().mean()) == pytest.approx(0.25, abs=0.015)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(3), atol=0.02, rtol=0)


def test_outlier_rate_is_validated():
    assert num_outliers(2048, 0.01) == 20
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inject_outliers(torch.zeros(1, 4, 3), 1.5, seed=0)


# ------------------------------------------------------------------------------ metrics


def test_map_matches_a_hand_computed_example():
    labels = torch.tensor([0, 1, 2, 0, 1])
    scores = torch.tensor(
        [
            [0.90, 0.05, 0.05],
            [0.80, 0.10, 0.10],
            [0.10, 0.60, 0.30],
            [0.40, 0.50, 0.10],
            [0.30, 0.70, 0.00],
        ]
    )
    # Class 0: ranking i0 (rel), i1, i3 (rel), ...: AP = (1/1 + 2/3) / 2 = 5/6.
    # Class 1: ranking i4 (rel), i2, i3, i1 (rel): AP = (1/1 + 2/4) / 2 = 3/4.
    # Class 2: i2 (rel) ranks first: AP = 1.
    assert average_precision(scores[:, 0], labels == 0) == pytest.approx(5 / 6)
    assert average_precision(scores[:, 1], labels == 1) == pytest.approx(3 / 4)
    assert mean_average_precision(scores, labels) == pytest.approx((5 / 6 + 3 / 4 + 1) / 3)
    assert top1_accuracy(scores, labels) == pytest.approx(2 / 5)


def test_average_precision_counts_ties_together_and_skips_absent_classes():
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([False, True])) == 0.5
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    assert mean_average_precision(scores, torch.tensor([0, 1])) == 1.0  # class 2 absent
    with pytest.raises(ValueError, match="undefined"):
        average_precision(torch.tensor([0.1]), torch.tensor([False]))


@pytest.mark.slow
def test_map_agrees_with_scikit_learn():
    from sklearn import metrics
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(60, 4, generator=gen).round(decimals=1)  # many ties
    labels = torch.randint(0, 4, (60,), generator=gen)
    expected = np.mean(
        [metrics.average_precision_score(labels == k, scores[:, k]) for k in range(4)]
    )
    assert mean_average_precision(scores, labels) == pytest.approx(expected)


# ------------------------------------------------------------------------------ model


def test_pointnet_has_the_papers_size_and_shapes():
    net = PointNet(40, pool="max", width=1024)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(0.81e6, rel=0.01)
    small = PointNet(5, pool="max", width=32).eval()
    assert small(torch.rand(3, 17, 3)).shape == (3, 5)
    with pytest.raises(ValueError, match="unknown pool"):
        PointNet(5, pool="mean")
    with pytest.raises(ValueError, match=r"\(B, N, 3\)"):
        small(torch.rand(3, 17))


def test_max_pooling_is_invariant_to_point_order():
    net = PointNet(4, pool="max", width=16).eval()
    x = torch.rand(2, 30, 3)
    torch.testing.assert_close(net(x), net(x[:, torch.randperm(30)]))


# ------------------------------------------------------------------------------ training


def _smoke_config(**changes) -> RunConfig:
    preset = {k: v for k, v in PRESETS["smoke"].items() if k in RunConfig.__dataclass_fields__}
    return dataclasses.replace(
        RunConfig(**preset, progress=False, test_outlier_rates=[0.0, 0.5]), **changes
    )


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["max", "welsch"])
def test_resume_after_interruption_gives_the_same_final_metrics(tmp_path, pool):
    config = _smoke_config(epochs=3, pool=pool)
    whole = run_training(config, tmp_path / "whole")
    assert run_training(config, tmp_path / "cut", stop_after_epochs=1) is None
    assert not (tmp_path / "cut" / "result.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        run_training(config, tmp_path / "cut")
    resumed = run_training(config, tmp_path / "cut", resume=True)
    assert resumed["results"] == whole["results"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # A finished run resumes to its saved results; another configuration is refused.
    assert run_training(config, tmp_path / "cut", resume=True) == resumed
    with pytest.raises(ValueError, match="another configuration"):
        run_training(dataclasses.replace(config, seed=5), tmp_path / "cut", resume=True)


def test_sweep_runs_one_model_per_pool_and_rate_or_per_pool_when_trained_clean():
    base = _smoke_config()
    same = SweepConfig(base, ["max", "welsch"], [0.0, 0.5], train_clean=False).runs()
    clean = SweepConfig(base, ["max", "welsch"], [0.0, 0.5], train_clean=True).runs()
    assert [name for name, _ in same] == ["max_o0", "max_o0.5", "welsch_o0", "welsch_o0.5"]
    assert same[1][1].train_outlier_rate == 0.5 and same[1][1].test_outlier_rates == [0.5]
    assert [name for name, _ in clean] == ["max_clean", "welsch_clean"]
    assert clean[0][1].train_outlier_rate == 0.0 and clean[0][1].test_outlier_rates == [0.0, 0.5]
    from declnet.apps.pointcloud.train import protocol

    assert protocol(same[1][1]) == "same" and protocol(clean[0][1]) == "clean"
    mixed = dataclasses.replace(base, train_outlier_rate=0.2, test_outlier_rates=[0.0, 0.2])
    assert protocol(mixed) == "mixed"


def test_presets_are_overridden_by_explicit_options():
    merged = apply_preset("demo", {"epochs": 3, "width": None})
    assert merged["epochs"] == 3 and merged["width"] == PRESETS["demo"]["width"]
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset("huge", {})
    assert PRESETS["paper"]["num_points"] == 2048 and PRESETS["paper"]["width"] == 1024


def test_sweep_protocol_flags():
    from declnet.apps.pointcloud.cli import _parser

    parse = _parser().parse_args
    assert parse(["sweep"]).train_clean is None  # the preset decides
    assert parse(["sweep", "--train-clean"]).train_clean is True
    assert parse(["sweep", "--same-rate"]).train_clean is False


def _parse_markdown_table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


@pytest.mark.slow
def test_smoke_preset_end_to_end_through_sweep_and_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in ("results.md", "accuracy_vs_outliers.png", "map_vs_outliers.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for run in ("max_clean", "quadratic_clean"):
        for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "result.json"):
            assert (out / run / name).is_file()
    (out / "results.md").unlink()
    assert main(["report", str(out), "--no-plots"]) == 0
    text = (out / "results.md").read_text()
    assert text in capsys.readouterr().out
    assert text.split("### Training time")[0] in printed
    table = _parse_markdown_table(text.split("### Training time")[0])
    assert table[0] == [
        "O %", "top-1 max", "top-1 Q", "mAP max", "mAP Q", "authors' mAP max", "authors' mAP Q",
    ]  # fmt: skip
    assert [row[0] for row in table[2:]] == ["0", "50"]
    for row in table[2:]:
        values = [float(c.strip("*")) for c in row[1:]]
        assert all(0.0 <= v <= 100.0 for v in values)
    timing = _parse_markdown_table(text.split("### Training time")[1])
    assert [row[1] for row in timing[2:]] == ["Data", "Fwd", "Bwd"]
    assert all(float(c) >= 0 for row in timing[2:] for c in row[2:])
    # Running the sweep again skips the finished runs.
    assert main(["sweep", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().err


def test_cli_reports_a_missing_data_root_with_the_layout(tmp_path, capsys):
    code = main(
        [
            "train",
            "--preset",
            "smoke",
            "--dataset",
            "modelnet40_h5",
            "--data-root",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "ply_data_train0.h5" in err


def test_train_command_writes_a_run(tmp_path, capsys):
    code = main(
        [
            "train",
            "--preset",
            "smoke",
            "--epochs",
            "1",
            "--outlier-rate",
            "0.25",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    final = json.loads((tmp_path / "run" / "result.json").read_text())
    assert final["protocol"] == "same" and final["results"][0]["outlier_rate"] == 0.25
    assert "outliers 25%" in capsys.readouterr().out
    assert math.isfinite(final["timing_ms_per_cloud"]["forward"])


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "declnet.apps.pointcloud",
        "train",
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((tmp_path / "run" / "result.json").read_text())
    assert final["world_size"] == 2
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2

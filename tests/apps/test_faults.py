"""The faults a user meets with the experiments: metrics, lost or wrongly trusted results,
damaged files, bad options, and the paper's protocols."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from declnet.apps import _common
from declnet.apps._common import RunLockedError, run_lock, write_json_atomic
from declnet.apps._loop import NonFiniteLossError, check_options, train_epoch
from declnet.apps._metrics import (
    authors_map,
    average_precision,
    interpolated_average_precision,
    mean_average_precision,
)
from declnet.apps.image.__main__ import main as image_main
from declnet.apps.pointcloud import RunConfig, run_training
from declnet.apps.pointcloud.cli import main as pointcloud_main
from declnet.apps.pointcloud.config import PRESETS, SweepConfig
from declnet.apps.pointcloud.data import load_dataset, load_modelnet40_h5, read_off
from declnet.apps.pointcloud.report import accuracy_table, write_report
from declnet.apps.pointcloud.train import evaluate


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smoke(**changes) -> RunConfig:
    preset = {k: v for k, v in PRESETS["smoke"].items() if k in RunConfig.__dataclass_fields__}
    return dataclasses.replace(RunConfig(**preset, progress=False), **changes)


def _pc_train(out: Path, *extra: str) -> int:
    return pointcloud_main(
        ["train", "--preset", "smoke", "--epochs", "1", "--out", str(out), "--no-progress", *extra]
    )


# ------------------------------------------------------------------------------ metrics


def test_pointcloud_evaluation_ranks_probabilities_for_map():
    torch.manual_seed(0)
    # Logits whose scale differs between samples: ranking them across samples differs from
    # ranking their probabilities.
    logits = torch.randn(40, 4) * torch.linspace(0.1, 10, 40)[:, None]
    labels = torch.arange(40) % 4
    model = torch.nn.Identity()
    points = logits  # the identity "model" returns its input as logits
    result = evaluate(model, points, labels, torch.device("cpu"))
    probabilities = logits.softmax(dim=1)
    assert result["map"] == pytest.approx(mean_average_precision(probabilities, labels))
    assert result["map"] != pytest.approx(mean_average_precision(logits, labels))
    assert result["map_authors"] == pytest.approx(authors_map(probabilities, labels))


def test_interpolated_ap_takes_the_precision_envelope():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    positives = torch.tensor([False, True, False, True])
    # Precision at the positives: 1/2 and 2/4; the envelope keeps 1/2 at both.
    assert average_precision(scores, positives) == pytest.approx(0.5)
    assert interpolated_average_precision(scores, positives) == pytest.approx(0.5)
    positives = torch.tensor([True, False, True, True])
    # 1, 2/3, 3/4: the envelope raises 2/3 to 3/4.
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert interpolated_average_precision(scores, positives) == pytest.approx((1 + 0.75 + 0.75) / 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        s, p = torch.rand(30, generator=g), torch.rand(30, generator=g) < 0.4
        if p.any():
            assert interpolated_average_precision(s, p) >= average_precision(s, p) - 1e-12


def test_authors_map_averages_the_first_six_classes_only():
    labels = torch.arange(80) % 8
    scores = torch.nn.functional.one_hot(labels, 8).float()
    scores[:, 6:] = torch.rand(80, 2)  # classes 6 and 7 ranked at random
    assert authors_map(scores, labels) == 1.0
    assert mean_average_precision(scores, labels) < 1.0
    assert authors_map(scores, labels, classes=8) == pytest.approx(
        (6 + sum(interpolated_average_precision(scores[:, c], labels == c) for c in (6, 7))) / 8
    )


# ------------------------------------------------------------------------------ overwriting


@pytest.mark.slow
def test_image_train_refuses_a_finished_run_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1"]
    assert image_main(args) == 0
    before = (out / "result.json").read_text()
    capsys.readouterr()
    assert image_main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and str(out) in err
    assert (out / "result.json").read_text() == before
    assert (out / "checkpoint.pt").is_file()
    assert image_main([*args, "--resume"]) == 0
    assert image_main([*args, "--overwrite"]) == 0
    assert json.loads((out / "result.json").read_text())["top1"] == json.loads(before)["top1"]


def test_pointcloud_train_refuses_a_run_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pc_train(out) == 0
    capsys.readouterr()
    assert _pc_train(out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _pc_train(out, "--overwrite") == 0


# ------------------------------------------------------------------------------ locking


def test_a_locked_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out) as lock:
        assert lock.is_file()
        assert _pc_train(out) == 2
        err = capsys.readouterr().err
        assert f"process {os.getpid()}" in err and ".lock" in err
        with pytest.raises(RunLockedError):
            run_training(_smoke(epochs=1), out)
    assert not (out / ".lock").exists()
    assert _pc_train(out) == 0  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    folder = tmp_path / "run"
    folder.mkdir()
    holder = {"host": __import__("socket").gethostname(), "pid": int(dead.stdout)}
    (folder / ".lock").write_text(json.dumps(holder))
    with run_lock(folder):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


def test_atomic_writes_use_unique_temporary_names(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace

    def spy(src, dst):
        names.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(_common.os, "replace", spy)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert len(set(names)) == 2 and all(n.startswith("a.json.") for n in names)
    assert n_tmp(tmp_path) == 0


def n_tmp(folder: Path) -> int:
    return len(list(folder.glob("*.tmp")))


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_killed_run_resumes_logging_each_epoch_once(
    tmp_path, capsys
):
    out = tmp_path / "run"
    args = [
        "train", "--preset", "smoke", "--epochs", "12", "--train-per-class", "30",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "declnet.apps.pointcloud", *args],
        env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        code = pointcloud_main([*args, "--resume"])  # this process: at the lock in no time
        running = first.poll() is None
    finally:
        first.kill()
        first.wait()
    if not running:
        pytest.skip("the first run ended before the second was refused")
    assert code == 2
    assert f"is in use by process {first.pid}" in capsys.readouterr().err
    # The killed run left its lock behind; resuming takes it over and finishes the run.
    assert (out / ".lock").exists() and not (out / "result.json").exists()
    assert pointcloud_main([*args, "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 13))
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()


# ------------------------------------------------------------------------------ NaN


def test_a_nan_loss_stops_the_epoch():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="nan at epoch 1, step 1"):
        train_epoch(
            model, [(x, torch.tensor([0, 1, 0, 1]))], optimizer, torch.device("cpu"),
            total=1, desc="t", progress=False, what="run", epoch=0,
        )  # fmt: skip
    assert torch.equal(model.weight, before)  # no step with the NaN gradient


def test_a_nan_coordinate_stops_training_without_a_result(tmp_path):
    config = _smoke(epochs=1)
    train, test = load_dataset(
        "synthetic", num_points=config.num_points, num_classes=config.num_classes,
        train_per_class=config.train_per_class, test_per_class=config.test_per_class,
    )  # fmt: skip
    train.points[3, 5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="training loss became nan"):
        run_training(config, tmp_path / "run", data=(train, test))
    assert not (tmp_path / "run" / "result.json").exists()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_nan_in_the_hdf5_data_is_reported_with_the_file(tmp_path):
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    data = np.zeros((2, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    for name in ("ply_data_train0.h5", "ply_data_test0.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("data", data=data)
            f.create_dataset("label", data=np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError, match=r"ply_data_train0.h5: 1 cloud.*NaN"):
        load_modelnet40_h5(tmp_path, num_points=4)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr", "nan", "--lr must be a finite positive"),
        ("--momentum", "1", r"--momentum must lie in \[0, 1\)"),
        ("--momentum", "-0.1", r"--momentum must lie in \[0, 1\)"),
        ("--seed", "-1", "--seed must be an integer >= 0"),
    ],
)
def test_bad_option_values_are_refused_naming_the_option(tmp_path, capsys, option, value, message):
    assert _pc_train(tmp_path / "pc", option, value) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "im"), option, value]
    assert image_main(args) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "pc").exists() and not (tmp_path / "im").exists()


def test_check_options_accepts_the_edges():
    check_options(lr=1e-9, momentum=0.0, seed=0)
    with pytest.raises(ValueError, match="--seed"):
        check_options(lr=0.1, momentum=0.5, seed=1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ damaged files


def test_a_corrupt_checkpoint_is_reported_with_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_training(_smoke(epochs=2), out, stop_after_epochs=1) is None
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    assert _pc_train(out, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a readable checkpoint" in err and "Traceback" not in err


def test_corrupt_json_files_are_reported_with_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pc_train(out) == 0
    (out / "config.json").write_text('{"pool": "max", ')
    assert _pc_train(out, "--resume") == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    (out / "result.json").write_text("{")
    assert pointcloud_main(["report", str(tmp_path), "--no-plots"]) == 2
    assert "result.json is not valid JSON" in capsys.readouterr().err
    im = tmp_path / "im" / "none"
    im.mkdir(parents=True)
    (im / "result.json").write_text("[1,")
    assert image_main(["report", str(tmp_path / "im")]) == 2
    assert "result.json is not valid JSON" in capsys.readouterr().err


def test_a_truncated_hdf5_file_is_reported_with_the_file(tmp_path):
    (tmp_path / "shape_names.txt").write_text("a\n")
    for name in ("ply_data_train0.h5", "ply_data_test0.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("data", data=np.zeros((64, 16, 3), np.float32))
            f.create_dataset("label", data=np.zeros((64, 1), np.uint8))
    path = tmp_path / "ply_data_train0.h5"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5 is not a readable HDF5 file"):
        load_modelnet40_h5(tmp_path, num_points=16)


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _pc_train(blocker) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert image_main(["train", "--preset", "smoke", "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _pc_train(blocker / "run") == 2  # a file where a parent folder belongs
    err = capsys.readouterr().err
    assert "Traceback" not in err and "another --out" in err
    assert blocker.read_text() == "x"


def test_a_full_disk_is_reported_with_what_to_do(tmp_path, capsys, monkeypatch):
    from declnet.apps.pointcloud import train as train_module

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(train_module, "save_atomic", full)
    assert _pc_train(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: No space left on device; free some space" in err
    assert not (tmp_path / "run" / ".lock").exists()


# ------------------------------------------------------------------------------ the paper


def test_table3_sweep_evaluates_its_clean_runs_at_every_rate():
    sweep = SweepConfig(base=_smoke(), pools=["max"], outlier_rates=[0.0, 0.1, 0.5])
    runs = dict(sweep.runs())
    assert list(runs) == ["max_o0", "max_o0.1", "max_o0.5"]
    assert runs["max_o0"].test_outlier_rates == [0.0, 0.1, 0.5]
    assert runs["max_o0.5"].test_outlier_rates == [0.5]


def _final(pool: str, train: float, rates: list[float], protocol: str) -> dict:
    results = [
        {"outlier_rate": r, "top1": 0.9 - r + train, "map": 0.6, "map_authors": 0.7}
        for r in rates
    ]
    return {"pool": pool, "train_outlier_rate": train, "protocol": protocol, "results": results}


def test_one_table3_sweep_reports_both_tables(tmp_path):
    finals = [
        _final("max", 0.0, [0.0, 0.5], "clean"),
        _final("max", 0.5, [0.5], "same"),
    ]
    same, clean = accuracy_table(finals, "same"), accuracy_table(finals, "clean")
    assert [line.split("|")[1].strip() for line in same.splitlines()[2:]] == ["0", "50"]
    assert [line.split("|")[1].strip() for line in clean.splitlines()[2:]] == ["0", "50"]
    assert "| 50 | **90.0** |" in same and "| 50 | **40.0** |" in clean
    assert "authors' mAP max" in same.splitlines()[0]
    for f in finals:
        run = tmp_path / f"{f['pool']}_{f['train_outlier_rate']}"
        run.mkdir()
        f.update(device="cpu", world_size=1, timing_ms_per_cloud={"data": 0, "forward": 0,
                 "backward": 0})  # fmt: skip
        (run / "result.json").write_text(json.dumps(f))
    text = write_report(tmp_path, plots=False)
    assert "Table 3 protocol" in text and "Table 4 protocol" in text
    assert "the authors' definition" in text
    # A run written by an older version (final.json) is still reported.
    legacy = tmp_path / "max_0.5" / "result.json"
    legacy.rename(legacy.with_name("final.json"))
    assert write_report(tmp_path, plots=False) == text


@pytest.mark.slow
def test_a_finished_clean_run_is_evaluated_at_new_rates_without_training(tmp_path):
    out = tmp_path / "max_o0"
    first = run_training(_smoke(epochs=1, test_outlier_rates=[0.0]), out)
    mtime = (out / "checkpoint.pt").stat().st_mtime_ns
    more = run_training(_smoke(epochs=1, test_outlier_rates=[0.0, 0.5]), out, resume=True)
    assert [r["outlier_rate"] for r in more["results"]] == [0.0, 0.5]
    assert more["results"][0] == first["results"][0]
    assert more["protocol"] == "clean"
    assert (out / "checkpoint.pt").stat().st_mtime_ns == mtime  # not trained again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_read_off_accepts_coff_and_per_face_colours(tmp_path):
    path = tmp_path / "tetra.off"
    path.write_text(
        "COFF\n4 2 0\n"
        "0 0 0 255 0 0 255\n1 0 0 0 255 0 255\n0 1 0 0 0 255 255\n0 0 1 9 9 9 255\n"
        "3 0 1 2 255 0 0\n4 0 1 3 2 0.5 0.5 0.5 1.0\n"
    )
    vertices, triangles = read_off(path)
    assert vertices.shape == (4, 3) and vertices[3].tolist() == [0, 0, 1]
    assert triangles.tolist() == [[0, 1, 2], [0, 1, 3], [0, 3, 2]]
    glued = tmp_path / "glued.off"
    glued.write_text("OFF3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2 10 20 30\n")
    assert read_off(glued)[1].tolist() == [[0, 1, 2]]

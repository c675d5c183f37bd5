"""The infrastructure shared by the experiments (``declnet.apps._common``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed

from declnet.apps._common import (
    DistributedInfo,
    ProcessRole,
    add_device_arguments,
    append_jsonl,
    barrier,
    config_differences,
    configure_threads,
    distributed_info,
    init_process_group,
    load_checkpoint,
    process_group,
    progress_bar,
    read_jsonl,
    resolve_device,
    save_atomic,
    sum_over_processes,
    synced_clock,
    trim_jsonl,
    wrap_ddp,
    write_json_atomic,
)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in _TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ processes, devices


def test_distributed_info_reads_the_torchrun_environment(no_torchrun):
    assert distributed_info() == DistributedInfo(0, 1, 0)
    assert distributed_info().is_main and not distributed_info().enabled
    no_torchrun.setenv("WORLD_SIZE", "4")
    no_torchrun.setenv("RANK", "3")
    no_torchrun.setenv("LOCAL_RANK", "1")
    info = distributed_info()
    assert info == DistributedInfo(rank=3, world_size=4, local_rank=1)
    assert info.enabled and not info.is_main
    no_torchrun.setenv("WORLD_SIZE", "1")
    no_torchrun.setenv("RANK", "3")
    assert distributed_info() == DistributedInfo()  # one process: the variables do not matter
    no_torchrun.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        distributed_info()


def test_process_role_serves_any_dataclass_with_rank_and_world_size():
    @dataclasses.dataclass(frozen=True)
    class Place(ProcessRole):
        rank: int
        world_size: int
        name: str = "gpu"

    assert [f.name for f in dataclasses.fields(Place)] == ["rank", "world_size", "name"]
    assert Place(0, 1).is_main and not Place(0, 1).enabled
    assert not Place(2, 3).is_main and Place(2, 3).enabled


def test_resolve_device_picks_the_cpu_without_cuda_and_rejects_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_resolve_device_explains_that_cuda_is_missing():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name} asked for CUDA"):
            resolve_device(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resolve_device_gives_cuda_an_index_and_torchrun_the_local_rank():
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0
    last = torch.cuda.device_count() - 1
    under_torchrun = DistributedInfo(rank=last, world_size=last + 1, local_rank=last)
    assert resolve_device("cuda:0", under_torchrun) == torch.device("cuda", last)
    torch.cuda.set_device(0)


def test_without_a_process_group_the_collectives_are_no_ops(no_torchrun):
    assert not torch.distributed.is_initialized()
    cpu = torch.device("cpu")
    assert init_process_group(DistributedInfo(), cpu) is False
    with process_group(DistributedInfo(), cpu):
        assert not torch.distributed.is_initialized()
    barrier()
    values = torch.tensor([1.0, 2.0])
    assert sum_over_processes(values, cpu) is values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the Gloo backend",
)
def test_process_group_is_joined_for_the_block_and_left_after_it(no_torchrun):
    # A group of one process, reached as torchrun's processes reach theirs (environment).
    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        no_torchrun.setenv(name, value)
    cpu = torch.device("cpu")
    info = DistributedInfo(rank=0, world_size=2)  # enabled, as under torchrun
    with process_group(info, cpu):
        assert torch.distributed.is_initialized()
        assert torch.distributed.get_backend() == "gloo"
        assert init_process_group(info, cpu) is False  # already joined: left to its owner
        values = torch.tensor([1.0, 2.0])
        summed = sum_over_processes(values, cpu)
        assert torch.equal(summed, values) and summed is not values
        barrier()
    assert not torch.distributed.is_initialized()


def test_wrap_ddp_gives_one_gpu_per_process_and_none_on_the_cpu(monkeypatch):
    # Building a real DistributedDataParallel takes over a second; record the call instead.
    calls = []

    def record(module, device_ids=None):
        calls.append((module, device_ids))
        return "wrapped"

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", record)
    model = torch.nn.Linear(3, 2)
    assert wrap_ddp(model, torch.device("cpu")) == "wrapped"
    wrap_ddp(model, torch.device("cuda", 1))
    assert calls == [(model, None), (model, [1])]


def test_configure_threads_clamps_and_shares_the_cores(no_torchrun, keep_threads):
    cores = os.cpu_count() or 1
    configure_threads(10 * cores)
    assert torch.get_num_threads() == cores
    configure_threads(0)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(1)
    configure_threads(None)  # torch's setting stays
    assert torch.get_num_threads() == 1
    no_torchrun.setenv("WORLD_SIZE", "2")
    no_torchrun.setenv("LOCAL_WORLD_SIZE", "2")
    configure_threads(None, share_cores=True)
    assert torch.get_num_threads() == max(1, cores // 2)


def test_synced_clock_moves_forward():
    cpu = torch.device("cpu")
    first = synced_clock(cpu)
    torch.ones(100, 100) @ torch.ones(100, 100)
    assert synced_clock(cpu) >= first


# ------------------------------------------------------------------------ files of a run


def test_save_atomic_round_trips_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "totals": {"data": 0.5}}
    save_atomic(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["totals"] == {"data": 0.5}
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lambda
        save_atomic({"epoch": 4, "hook": lambda: None}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_write_json_atomic_writes_indented_json_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"top1": 0.5, "runs": [1, 2]})
    assert path.read_text() == json.dumps({"top1": 0.5, "runs": [1, 2]}, indent=2) + "\n"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"device": torch.device("cpu")})
    assert json.loads(path.read_text()) == {"top1": 0.5, "runs": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_jsonl_append_and_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"epoch": 1, "loss": 0.25})
    append_jsonl(path, {"epoch": 2, "loss": float("nan")})
    assert path.read_text().splitlines()[0] == '{"epoch": 1, "loss": 0.25}'
    records = read_jsonl(path)
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["loss"] != records[1]["loss"]
    path.write_text('{"epoch": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        read_jsonl(path)


def test_trim_jsonl_keeps_the_epochs_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"epoch": 1, "x": 1.0}', '{"epoch": 2,   "x": 2}', '{"epoch": 3, "x": 3}']
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "x"')  # the last append was cut short
    trim_jsonl(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"  # kept lines as they were
    trim_jsonl(path, 0)  # a fresh run
    assert path.read_text() == ""
    path.write_text("garbage\n")
    trim_jsonl(path, 0)  # a fresh run does not read the old log
    assert path.read_text() == ""
    missing = tmp_path / "new.jsonl"
    trim_jsonl(missing, 5)
    assert missing.read_text() == ""
    path.write_text('{"epoch": 1}\nbroken\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        trim_jsonl(path, 1)
    path.write_text('{"step": 1}\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 1 has no epoch"):
        trim_jsonl(path, 1)


def test_config_differences_names_each_key_sorted_and_skips_ignored_ones():
    saved = {"width": 2, "lr": 0.1, "device": "cpu", "old": 1}
    current = {"width": 4, "lr": 0.1, "device": "cuda", "new": True}
    assert config_differences(saved, current, ignore=("device",)) == [
        "new: None there, True now",
        "old: 1 there, None now",
        "width: 2 there, 4 now",
    ]
    assert config_differences(saved, dict(saved)) == []


# ------------------------------------------------------------------------ command line, progress


def test_add_device_arguments_defaults_to_auto_and_parses_threads():
    parser = argparse.ArgumentParser()
    add_device_arguments(parser.add_argument_group("system"))
    args = parser.parse_args([])
    assert args.device == "auto" and args.threads is None
    args = parser.parse_args(["--device", "cuda:1", "--threads", "3"])
    assert args.device == "cuda:1" and args.threads == 3


def test_progress_bar_without_a_bar_iterates_and_ignores_postfix(capsys):
    bar = progress_bar(iter(range(3)), total=3, desc="epoch", enabled=False)
    items = []
    for item in bar:
        bar.set_postfix(loss="0.1", refresh=False)
        items.append(item)
    assert items == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_bar_draws_on_stderr_when_enabled(capsys):
    bar = progress_bar(range(4), total=4, desc="epoch 1/2", enabled=True)
    assert list(bar) == [0, 1, 2, 3]
    bar.set_postfix(loss="0.5")
    captured = capsys.readouterr()
    assert "epoch 1/2" in captured.err and captured.out == ""

"""Data-parallel training on 2 CPU processes (gloo): equal to 1 process with accumulation."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit.loss as loss_module
from conftest import tiny_config
from lorakit.cli import app
from lorakit.config import validate_config
from lorakit.train import train

pytestmark = pytest.mark.slow  # launches real 2-process runs: minutes, but they run in CI too


def _write(tmp_path, raw, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _two_process(config, *extra, **popen):
    command = [sys.executable, "-m", "lorakit", "train", str(config), "--num-processes", "2", *extra]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _children(pid):
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _workers(proc):
    """The training workers: children of the accelerate launcher, itself a child of lorakit."""
    return [w for launcher in _children(proc.pid) for w in _children(launcher)]


def _alive(pids):
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def _close(a, b):
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process, batch 4, accumulation 2: what 2 processes of batch 4 must reproduce.

    Every row starts with the same 46 tokens, which one process and DDP compute once per
    batch and FSDP in every row (lorakit.prefix): the runs must agree all the same."""
    tmp = tmp_path_factory.mktemp("one")
    raw = tiny_config(tmp, tiny_model_dir, max_steps=12, batch_size=4, grad_accum=2, save_every=4)
    raw["data"].update(prompt_template="Add the two digits below and write their sum.\n{question}", max_length=96)
    shared = []
    with pytest.MonkeyPatch.context() as patch:
        once = loss_module.hidden_after_prefix
        patch.setattr(loss_module, "hidden_after_prefix", lambda *a: shared.append(a[-1]) or once(*a))
        train(validate_config(raw, "test"))
    assert len(shared) >= 24 and min(shared) >= 46  # every micro-batch shared its prefix
    return raw, tmp / "run"


def test_two_processes_equal_one_with_accumulation(reference, tmp_path):
    raw, one = reference
    two = dict(raw, training={**raw["training"], "grad_accum": 1, "output_dir": str(tmp_path / "two")})
    done = _two_process(_write(tmp_path, two, "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 = 4 × 1 accumulation × 2 process(es)" in done.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(one), rel=1e-5)  # each step logged once
    adapter = "adapter/adapter_model.safetensors"
    assert _close(load_file(tmp_path / "two" / adapter), load_file(one / adapter))
    names = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-12").iterdir())
    assert names == [".lorakit-files.json", "adapter", "optimizer.safetensors", "rng-0.safetensors",
                     "rng-1.safetensors", "state.json"]
    assert json.loads((tmp_path / "two" / "checkpoints" / "step-12" / ".lorakit-files.json").read_text()) == names[1:]


def test_two_process_resume_after_kill_9(reference, tmp_path):
    raw, _ = reference
    # Compared with an uninterrupted two-process run, bit for bit: over 120 steps, one process
    # with accumulation drifts from two processes by float rounding (a few 1e-7), which
    # test_two_processes_equal_one_with_accumulation bounds over 12 steps.
    whole = dict(raw, training={**raw["training"], "max_steps": 120, "grad_accum": 1, "output_dir": str(tmp_path / "one")})
    assert _two_process(_write(tmp_path, whole, "whole")).returncode == 0
    killed = dict(whole, training={**whole["training"], "output_dir": str(tmp_path / "killed")})
    config = _write(tmp_path, killed, "killed")
    proc = _two_process(config, start_new_session=True)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not list(checkpoints.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = _workers(proc)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGKILL)  # lorakit and the launcher; the workers must follow
    proc.wait()
    deadline = time.time() + 30
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(workers), "workers outlived their killed launcher"
    assert not (tmp_path / "killed" / "adapter").exists(), "the run ended before it could be killed"
    done = _two_process(config, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at" in done.stderr
    adapter = "adapter/adapter_model.safetensors"
    resumed, uninterrupted = load_file(tmp_path / "killed" / adapter), load_file(tmp_path / "one" / adapter)
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_needs_the_same_process_count(reference, tmp_path):
    raw, one = reference
    result = CliRunner().invoke(app, ["train", str(_write(tmp_path, raw, "same")), "--resume"])
    assert result.exit_code == 0  # same process count: fine
    done = _two_process(_write(tmp_path, raw, "other"), "--resume")
    assert done.returncode != 0 and "written by 1 process(es), this run has 2" in done.stderr


def test_more_processes_than_devices_is_refused_before_loading():
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")
    result = CliRunner().invoke(app, ["train", config, "--num-processes", str((os.cpu_count() or 1) + 1)])
    assert result.exit_code == 2 and "CPU core(s)" in result.output


def test_launch_config_errors_are_clear_and_early(tmp_path, monkeypatch):
    import importlib.util

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")
    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")

    def run(accelerate_config):
        return CliRunner().invoke(app, ["train", config, "--accelerate-config", str(accelerate_config)])

    missing = run(tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "nope.yaml: no such file" in missing.output
    (tmp_path / "broken.yaml").write_text("distributed_type: [FSDP\n")
    broken = run(tmp_path / "broken.yaml")
    assert broken.exit_code == 2 and "broken.yaml" in broken.output and "not valid YAML" in broken.output
    (tmp_path / "other.yaml").write_text("lora: {r: 8}\n")
    other = run(tmp_path / "other.yaml")
    assert other.exit_code == 2 and "not an Accelerate config" in other.output
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    deepspeed = run(os.path.join(shipped, "deepspeed-zero2.yaml"))
    assert deepspeed.exit_code == 2 and "pip install deepspeed" in deepspeed.output


def test_fsdp_config_on_cpus_says_it_runs_unsharded(reference, tmp_path):
    raw, one = reference
    two = dict(raw, training={**raw["training"], "grad_accum": 1, "max_steps": 2, "output_dir": str(tmp_path / "f")})
    fsdp = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "fsdp.yaml")
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", str(_write(tmp_path, two, "f")),
                           "--accelerate-config", fsdp], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "asks for FSDP, but Accelerate runs MULTI_CPU" in done.stderr and "2 (MULTI_CPU)" in done.stderr


def test_a_dying_worker_stops_the_run(reference, tmp_path):
    raw, _ = reference
    slow = dict(raw, training={**raw["training"], "grad_accum": 1, "max_steps": 100000, "save_every": 2,
                               "output_dir": str(tmp_path / "dies")})
    proc = _two_process(_write(tmp_path, slow, "dies"), start_new_session=True)
    deadline = time.time() + 240
    while not list((tmp_path / "dies" / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(_workers(proc)[0], signal.SIGKILL)
    start = time.time()
    try:
        code = proc.wait(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert code != 0 and time.time() - start < 120


def test_accelerate_launch_with_the_shipped_ddp_config(reference, tmp_path):
    raw, one = reference
    two = dict(raw, training={**raw["training"], "grad_accum": 1, "output_dir": str(tmp_path / "two")})
    config_file = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "ddp.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
         "-m", "lorakit", "train", str(_write(tmp_path, two, "two"))],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("adapter written to") == 1  # only the main process reports
    adapter = "adapter/adapter_model.safetensors"
    assert _close(load_file(tmp_path / "two" / adapter), load_file(one / adapter))


def test_qlora_under_ddp(reference, tmp_path):
    raw, _ = reference
    q = dict(raw, model={**raw["model"], "quantization": {"bits": 4}},
             training={**raw["training"], "grad_accum": 1, "max_steps": 4, "output_dir": str(tmp_path / "q")})
    done = _two_process(_write(tmp_path, q, "q"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(_losses(tmp_path / "q")) == 4



def _fsdp_on_cpu(tmp_path, raw, *extra):
    helper = os.path.join(os.path.dirname(__file__), "fsdp_on_cpu.py")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", helper, "train",
         str(_write(tmp_path, raw, "run")), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "true"})


def test_fsdp_shards_yet_trains_and_saves_like_one_process(reference, tmp_path):
    raw, one = reference
    run = tmp_path / "fsdp"
    fsdp = dict(raw, training={**raw["training"], "grad_accum": 1, "output_dir": str(run)})
    done = _fsdp_on_cpu(tmp_path, fsdp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 (FSDP)" in done.stderr and re.search(r"sharded parameters: [1-9]", done.stderr)
    assert done.stderr.count("adapter written to") == 1
    assert _losses(run) == pytest.approx(_losses(one), rel=1e-5)
    adapter = "adapter/adapter_model.safetensors"
    assert _close(load_file(run / adapter), load_file(one / adapter))  # whole tensors, gathered from shards
    # checkpoints hold whole tensors too, and a sharded run resumes from them exactly
    assert _close(load_file(run / "checkpoints/step-8" / adapter), load_file(one / "checkpoints/step-8" / adapter))
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints/step-12")
    resumed = _fsdp_on_cpu(tmp_path, fsdp, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _close(load_file(run / adapter), load_file(one / adapter))

"""Starting a distributed run: ``lorakit train --num-processes N [--accelerate-config
FILE]`` re-runs itself under ``accelerate launch``, which starts N processes
(torch.distributed; NCCL on GPUs, gloo on CPUs) and stops them all when one dies."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lorakit.errors import LaunchError


def available_devices() -> tuple[int, str]:
    """How many processes this machine can give one device each: GPUs, else CPU cores."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU(s)"
    return os.cpu_count() or 1, "CPU core(s)"


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so no worker outlives a
    killed launcher (elsewhere this is a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_config(path: str) -> dict:
    """An Accelerate config file, checked for what this machine can run.

    Raises:
        LaunchError: a missing or unreadable file, or DeepSpeed asked for but not installed.
    """
    import importlib.util

    from lorakit.config import read_yaml

    if not Path(path).exists():
        raise LaunchError(f"--accelerate-config {path}: no such file")
    settings = read_yaml(path, f"--accelerate-config {path}")  # strict: a key given twice is refused
    if not isinstance(settings, dict) or "distributed_type" not in settings:
        raise LaunchError(f"--accelerate-config {path}: not an Accelerate config (no distributed_type); "
                          "see configs/accelerate/")
    if settings["distributed_type"] == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"--accelerate-config {path} asks for DeepSpeed, which is not installed: "
                          "pip install deepspeed (it needs CUDA GPUs), or use configs/accelerate/fsdp.yaml")
    return settings


def launch(num_processes: int, train_args: list[str], config_file: str | None = None) -> int:
    """Run ``lorakit train TRAIN_ARGS`` on ``num_processes`` processes; returns the exit code.

    Args:
        num_processes: processes to start; 1 with ``config_file`` keeps the file's count.
        train_args: the ``lorakit train`` arguments each process gets.
        config_file: an Accelerate config (DDP, FSDP, DeepSpeed); plain DDP without one.

    Raises:
        LaunchError: when the machine has fewer devices than processes asked for, or the
            config file cannot be used here.
    """
    engine = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if config_file is not None:
        settings = read_launch_config(config_file)
        engine = ["--config_file", config_file]
        if num_processes == 1:
            num_processes = int(settings.get("num_processes", 1))
    have, kind = available_devices()
    if num_processes > have:
        raise LaunchError(f"--num-processes {num_processes}: this machine has {have} {kind}; "
                          f"use at most {have} (or see the README for multi-machine launches)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo on CPU processes
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *engine,
        "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
        "-m", "lorakit", "train", *train_args,
    ]
    return subprocess.call(command, env=env, preexec_fn=die_with_parent)

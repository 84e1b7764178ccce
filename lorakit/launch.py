"""Starting a data-parallel run: ``lorakit train --num-processes N`` re-runs itself
under ``accelerate launch``, which starts N processes (torch.distributed; NCCL on GPUs,
gloo on CPUs) and stops them all when one dies."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

import torch


class LaunchError(ValueError):
    """A launch that cannot work on this machine."""


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


def launch(num_processes: int, train_args: list[str]) -> int:
    """Run ``lorakit train TRAIN_ARGS`` on ``num_processes`` processes; returns the exit code.

    Raises:
        LaunchError: when the machine has fewer devices than processes asked for.
    """
    have, kind = available_devices()
    if num_processes > have:
        raise LaunchError(f"--num-processes {num_processes}: this machine has {have} {kind}; "
                          f"use at most {have} (or see the README for multi-machine launches)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo on CPU processes
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(num_processes), "--num_machines", "1",
        "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "lorakit", "train", *train_args,
    ]
    return subprocess.call(command, env=env, preexec_fn=die_with_parent)

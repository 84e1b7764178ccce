"""``lorakit inspect``: what an adapter holds, whether it fits a base, and what rank it used.

The singular values of each update ``ΔW = scaling·B·A`` come from the thin factors:
with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), ``ΔW = Q_B (scaling·R_B R_Aᵀ) Q_Aᵀ``, so
the spectrum is that of an r×r matrix: exact, and never a d_out×d_in SVD.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.adapter_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_adapter, pattern_value, read_adapter_config


@dataclass
class ModuleSpectrum:
    """One adapted layer's update."""

    name: str
    r: int
    shape: tuple[int, int]
    norm: float
    singular_values: list[float]
    rank90: int
    rank99: int


@dataclass
class AdapterReport:
    """Everything ``lorakit inspect`` prints."""

    files: dict[str, int]
    r: int
    alpha: float
    scaling: float
    dtypes: list[str]
    n_tensors: int
    n_params: int
    modules: list[ModuleSpectrum]
    recommended_rank: int
    problems: list[str] = field(default_factory=list)


def spectrum(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling·B·A`` (B: d_out×r, A: r×d_in), largest first."""
    _, rb = torch.linalg.qr(B.double())
    _, ra = torch.linalg.qr(A.double().T)
    return torch.linalg.svdvals(scaling * rb @ ra.T)


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest singular directions that hold ``energy`` of ``‖ΔW‖²``."""
    power = singular_values**2
    total = float(power.sum())
    if total == 0:
        return 0
    kept = torch.cumsum(power, 0) / total
    return int((kept < energy - 1e-12).sum()) + 1


def inspect_adapter(directory: str | Path, base: torch.nn.Module | None = None) -> AdapterReport:
    """Read an adapter directory (lorakit's or PEFT's) and analyse every update.

    Args:
        directory: the adapter directory.
        base: a model (weights not needed: a meta-device skeleton will do) to check the
            adapter against; problems are listed in the report, not raised.
    """
    path = Path(directory)
    config, _ = read_adapter_config(path)
    peft = json.loads((path / CONFIG_NAME).read_text())
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    tensors, dtypes = {}, set()
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
            dtypes.add(str(tensors[key].dtype).removeprefix("torch."))
    modules = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len(PREFIX) : -len(".lora_A.weight")]
        A, B = tensors[key], tensors[f"{PREFIX}{name}.lora_B.weight"]
        r = pattern_value(peft.get("rank_pattern"), name, peft.get("r", A.shape[0]))
        alpha = pattern_value(peft.get("alpha_pattern"), name, peft.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r
        sv = spectrum(A, B, scaling)
        modules.append(ModuleSpectrum(name, A.shape[0], (B.shape[0], A.shape[1]), float(sv.norm()),
                                      sv.tolist(), effective_rank(sv, 0.90), effective_rank(sv, 0.99)))
    ranks = sorted(m.rank90 for m in modules)
    scaling = config.alpha / math.sqrt(config.r) if config.use_rslora else config.alpha / config.r
    return AdapterReport(
        files=files, r=config.r, alpha=config.alpha, scaling=scaling, dtypes=sorted(dtypes),
        n_tensors=len(tensors), n_params=sum(t.numel() for t in tensors.values()), modules=modules,
        # the smallest rank that keeps 90% of the update energy in most (over half of the) layers
        recommended_rank=ranks[len(ranks) // 2] if ranks else 0,
        problems=check_adapter(base, path) if base is not None else [],
    )


def plot_report(report: AdapterReport, out: Path) -> Path:
    """Per-layer update norms and normalized spectra, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.bar(range(len(report.modules)), [m.norm for m in report.modules])
    left.set_xlabel("adapted layer (in model order)")
    left.set_ylabel("‖ΔW‖ (Frobenius)")
    for m in report.modules:
        top = m.singular_values[0] or 1.0
        right.plot(range(1, len(m.singular_values) + 1), [s / top for s in m.singular_values], alpha=0.3)
    right.set_yscale("log")
    right.set_xlabel("singular value index")
    right.set_ylabel("σ / σ₁")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

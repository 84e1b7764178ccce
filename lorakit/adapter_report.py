"""``lorakit inspect``: what an adapter holds, whether it fits a base, and what rank it used.

The singular values of each update ``ΔW = scaling·B·A`` come from the thin factors:
with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), ``ΔW = Q_B (scaling·R_B R_Aᵀ) Q_Aᵀ``, so
the spectrum is that of an r×r matrix: exact, and never a d_out×d_in SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.adapter_io import PREFIX, WEIGHTS_NAME, adapter_problems, read_adapter
from lorakit.inject import pattern_value
from lorakit.lora import WEIGHT_INITS
from lorakit.lora import scaling as lora_scaling


@dataclass
class ModuleSpectrum:
    """One adapted layer's update."""

    name: str
    r: int
    alpha: float
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
    dora: bool = False
    notes: list[str] = field(default_factory=list)  # how the adapter was initialised and saved


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


def inspect_adapter(directory: str | Path, base: str | None = None) -> AdapterReport:
    """Read an adapter directory (lorakit's or PEFT's) and analyse every update.

    r, alpha and scaling come from the same typed config that loading uses, so what is
    printed is what is computed.

    Args:
        directory: the adapter directory.
        base: a model to check the adapter against (only its config is read); problems
            are listed in the report, not raised.
    """
    adapter = read_adapter(directory)
    config = adapter.config
    files = {p.name: p.stat().st_size for p in sorted(adapter.path.iterdir()) if p.is_file()}
    tensors = adapter.tensors
    modules = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len(PREFIX) : -len(".lora_A.weight")]
        A, B = tensors[key], tensors.get(f"{PREFIX}{name}.lora_B.weight")
        if B is None or B.shape[1] != A.shape[0]:
            continue  # reported by the fit check against a base; nothing to analyse
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha)
        sv = spectrum(A, B, lora_scaling(r, alpha, config.use_rslora))
        modules.append(ModuleSpectrum(name, A.shape[0], alpha, (B.shape[0], A.shape[1]), float(sv.norm()),
                                      sv.tolist(), effective_rank(sv, 0.90), effective_rank(sv, 0.99)))
    ranks = sorted(m.rank90 for m in modules)
    problems = []
    if base is not None:
        from lorakit.targets import skeleton

        problems = adapter_problems(skeleton(base), adapter)
    notes = []
    if config.init in WEIGHT_INITS:
        notes.append(f"init {config.init}, saved by PEFT without conversion: it is an update of the base minus its "
                     "principal part, which lorakit rebuilds from the base when it loads it (merge alone, at weight 1; "
                     "adapter exports refuse it)")
    with safe_open(adapter.path / WEIGHTS_NAME, "pt") as file:
        if note := (file.metadata() or {}).get("lorakit"):
            notes.append(note)
    return AdapterReport(
        files=files, r=config.r, alpha=config.alpha, scaling=lora_scaling(config.r, config.alpha, config.use_rslora),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        n_tensors=len(tensors), n_params=sum(t.numel() for t in tensors.values()), modules=modules,
        # the smallest rank that keeps 90% of the update energy in most (over half of the) layers
        recommended_rank=ranks[len(ranks) // 2] if ranks else 0, problems=problems, dora=config.use_dora,
        notes=notes,
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

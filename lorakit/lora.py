"""The LoRA math, in one place.

A frozen projection ``W0`` gets a trainable low-rank update::

    h = W0·x + scaling · B·A·dropout(x)        scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

    x ──┬──► W0 (frozen, d_out × d_in) ───────────────┐
        └──► dropout ─► A (r × d_in) ─► B (d_out × r) ─► × scaling ─► (+) ─► h

A starts random and B starts at zero, so a fresh adapter changes nothing.
``merge()`` folds ``scaling·B·A`` into ``W0`` and ``unmerge()`` takes it back out.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") also trains a
magnitude ``m`` per output row and renormalises the adapted weight row by row::

    W' = m · (W0 + scaling·B·A) / ‖W0 + scaling·B·A‖_row        m starts at ‖W0‖_row

with the norm treated as a constant in backward (the paper's section 4.3, as PEFT does).

PiSSA and OLoRA start A and B from the base weight instead of from noise, and take that
part out of the base so the model is unchanged at step 0 (``init_from_weight``)::

    PiSSA (Meng et al., 2024):  W0 = U·S·Vᵀ      B = U_r·√(S_r/s)    A = √(S_r/s)·V_rᵀ
    OLoRA (Büyükakyüz, 2024):   W0 = Q·R         B = Q_r             A = R_r
    the base becomes W0 − s·B0·A0

An adapter trained that way is only right on that modified base, so it is saved as a plain
LoRA on ``W0`` (``converted_factors``): ``s·B·A − s·B0·A0 = s·[B, −B0]·[A; A0]``, rank 2r.

Fused projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``)
can carry adapters on some output slices only, as loralib's ``MergedLinear``: slice
``i`` owns rows ``r·i … r·(i+1)`` of A and its own block of B, and writes only to
its output rows (``out_index``).

Why low rank (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
the update a pretrained model needs for a new task has a low intrinsic rank, so ``B·A``
with ``r ≪ min(d_in, d_out)`` captures it with a fraction of the parameters, and merging
it leaves inference exactly as fast as the base.

The factors are stored (and trained, and saved) in float32; the update is computed in the
activations' dtype, as mixed precision does everywhere: under ``dtype: auto`` on bf16
hardware that is bfloat16 with float32 accumulation, which the bf16 base output it is
added to could not hold more precisely anyway. ``delta_weight`` and merging stay float32.

Speed-ups that do not change the formula (sibling projections sharing one dropout and one
A matmul, plain layers called as ``F.linear``, bitsandbytes' quirks) live in
``lorakit.fastpath``. This module imports torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.fastpath import SharedInput, add_update, base_rows, dense_linear, dequantized_weight, dropout, dropped_down, is_4bit, is_bare_linear, unpack_cpu_4bit


# Initialisations computed from the base weight (besides ``pissa_niter_N``).
WEIGHT_INITS = ("pissa", "olora")


def scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The update's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base_layer: ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``)
            or a bitsandbytes ``Linear4bit``.
        r: rank of the update per slice.
        alpha: numerator of the scaling factor.
        dropout: dropout on the adapter's input; 0 adds no work at all.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` (uniform, as PEFT and loralib) or ``"gaussian"`` (std 1/r) for A,
            or ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` (see ``init_from_weight``).
        fan_in_fan_out: the base stores its weight as ``(d_in, d_out)`` (GPT-2 ``Conv1D``).
        out_slices: for fused layers, one index tensor of output rows per adapted slice;
            ``None`` adapts every output.
        use_dora: weight-decomposed LoRA (a trained magnitude per output row).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        fan_in_fan_out: bool = False,
        out_slices: list[torch.Tensor] | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LoraError(f"LoRA rank r must be > 0, got {r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.use_rslora, self.fan_in_fan_out = use_rslora, fan_in_fan_out
        self.scaling = scaling(r, alpha, use_rslora)
        self.merged, self.merged_weight = False, 1.0
        if fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        n_slices = len(out_slices) if out_slices else 1
        self.sliced = bool(out_slices)
        self.slice_sizes = [len(s) for s in out_slices] if out_slices else [self.out_features]
        # Concatenated output rows of all slices, in slice order; None = all rows.
        self.register_buffer(
            "out_index", torch.cat(out_slices).long() if out_slices else None, persistent=False
        )
        factory = {"device": base_layer.weight.device}
        self.lora_A = nn.Linear(self.in_features, n_slices * r, bias=False, **factory)
        self.lora_B = nn.Linear(r, sum(self.slice_sizes), bias=False, **factory)
        self.use_dora = use_dora
        # (A0, B0), float32 on the CPU, when the init took them out of the base weight.
        self.initial: tuple[torch.Tensor, torch.Tensor] | None = None
        if init in WEIGHT_INITS or (init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()):
            self.init_from_weight(init)
        else:
            self.reset_parameters(init)
        if use_dora:
            if out_slices:
                raise LoraError("DoRA adapts whole layers: target the fused layer by name, not q/k/v slices")
            self.lora_magnitude_vector = nn.Parameter(self._row_norm(self.delta_weight().detach()))
        self.shared_input: SharedInput | None = None  # set by lorakit.inject for sibling projections
        self.train(base_layer.training)  # a wrapper must not switch dropout on in an eval model

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A random, B zero: the adapter starts as the identity update."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise LoraError(f"unknown LoRA init {init!r}: use kaiming, gaussian, pissa, pissa_niter_N or olora")
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def init_from_weight(self, method: str) -> None:
        """PiSSA or OLoRA: A and B from the base weight, and ``s·B·A`` taken out of it.

        ``pissa`` uses the exact SVD; ``pissa_niter_N`` a randomized SVD with N subspace
        iterations, seeded so that the same weight always gives the same factors; ``olora``
        the QR decomposition. The output is unchanged (up to the weight dtype's rounding).

        Raises:
            LoraError: a 4-bit base (the residual would have to be re-quantized), fused
                slices, DoRA, or a rank above the weight's smaller dimension.
        """
        if is_4bit(self.base_layer) or not self.base_layer.weight.dtype.is_floating_point:
            raise LoraError(f"lora.init: {method} changes the base weight, which a quantized base cannot take "
                            "without re-quantizing it; use init: kaiming with QLoRA")
        if self.sliced or self.use_dora:
            raise LoraError(f"lora.init: {method} is not supported with {'q/k/v slices' if self.sliced else 'DoRA'}")
        r = self.r
        if r > min(self.in_features, self.out_features):
            raise LoraError(f"lora.init: {method} needs r ≤ min(d_in, d_out) = "
                            f"{min(self.in_features, self.out_features)}, got r={r}")
        weight = self._dense_base()
        if method == "olora":
            Q, R = torch.linalg.qr(weight)
            B, A = Q[:, :r], R[:r]
        else:
            if method == "pissa":
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    U, S, V = torch.svd_lowrank(weight, q=r, niter=int(method.removeprefix("pissa_niter_")))
                Vh = V.T
            root = torch.sqrt(S / self.scaling)
            A, B = root[:, None] * Vh, U * root[None, :]
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        residual = weight - self.scaling * (B @ A)
        self.base_layer.weight.copy_(residual.T if self.fan_in_fan_out else residual)
        self.initial = (A.detach().cpu().clone(), B.detach().cpu().clone())

    def _initial_delta(self, initial: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``s·B0·A0`` in the base weight's layout, float32, on the weight's device."""
        A0, B0 = (t.to(self.base_layer.weight.device) for t in initial)
        delta = self.scaling * (B0 @ A0)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def restore_base(self) -> None:
        """Give the base weight back what ``init_from_weight`` took out (up to its dtype's rounding)."""
        if self.initial is not None:
            weight = self.base_layer.weight
            weight.copy_(weight.float() + self._initial_delta(self.initial))
            self.initial = None

    def converted_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of the same update as a LoRA on the original base: ``[A; A0]`` and
        ``[B, −B0]`` (rank 2r, the same scaling once alpha is doubled; √2·alpha with rsLoRA)."""
        A, B = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self.initial is None:
            return A, B
        A0, B0 = (t.to(A.device) for t in self.initial)
        return torch.cat([A, A0]), torch.cat([B, -B0], dim=1)

    @torch.no_grad()
    def load_converted(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """The inverse of ``converted_factors`` (resuming a run): the trained halves become
        A and B; initial halves that differ from this layer's (another machine's SVD)
        move the base to the residual they were trained against."""
        r = self.r
        self.lora_A.weight.copy_(A[:r])
        self.lora_B.weight.copy_(B[:, :r])
        saved = (A[r:].float().cpu(), -B[:, r:].float().cpu())
        if not all(torch.equal(a, b) for a, b in zip(saved, self.initial)):
            weight = self.base_layer.weight
            weight.copy_(weight.float() + self._initial_delta(self.initial) - self._initial_delta(saved))
            self.initial = saved

    def train(self, mode: bool = True) -> LoRALinear:
        super().train(mode)
        if mode:
            unpack_cpu_4bit(self.base_layer)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Direct dict reads instead of attribute access, 2-D matmuls, and a plain linear base
        # applied without its module call: a small batch through many unmerged adapters feels
        # every microsecond of per-layer overhead.
        modules = self._modules
        base = modules["base_layer"]
        bare = is_bare_linear(base)
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if self.merged:
            return base_rows(base, bare, x, rows).view(*lead, -1)
        if self.use_dora:
            return self._dora_forward(rows, base_rows(base, bare, x, rows)).view(*lead, -1)
        # The down-projection before the base, while x is still in cache: the base's weight
        # matrix streams through the cache and evicts it (measured: a 1x8-token forward through
        # many adapters pays less this way round).
        grad = torch.is_grad_enabled()
        # Under torch.compile the compiler schedules the sibling matmuls itself, and the
        # shared round's Python bookkeeping (tensor identity, versions) would break its graph.
        if not torch.compiler.is_compiling() and self.shared_input is not None and grad:
            a = self.shared_input.down(self, x)
        else:
            A = modules["lora_A"]._parameters["weight"].to(rows.dtype)
            if self.dropout and self.training:
                a = dropped_down(rows, A, self.dropout)  # (rows, r)
            else:
                a = F.linear(rows, A)
        result = base_rows(base, bare, x, rows)
        B = modules["lora_B"]._parameters["weight"].to(a.dtype)
        if self.sliced:
            parts = [F.linear(a_i, b_i) for a_i, b_i in zip(a.split(self.r, -1), B.split(self.slice_sizes))]
            delta = torch.cat(parts, -1) * self.scaling
            return result.index_add(-1, self.out_index, delta.to(result.dtype)).view(*lead, -1)
        if grad:
            # Scale the rank-r intermediate: backward then pays for r columns, not d_out.
            return add_update(result, a * self.scaling, B, 1.0, bare).view(*lead, -1)
        return add_update(result, a, B, self.scaling, bare).view(*lead, -1)

    def _dense_base(self) -> torch.Tensor:
        """The base weight as ``(d_out, d_in)`` in float32 (dequantized for a 4-bit base)."""
        weight = dequantized_weight(self.base_layer).float()
        return weight.T if self.fan_in_fan_out else weight

    def _row_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """``‖W0 + delta‖`` per output row, float32; ``delta`` in the base weight's layout."""
        weight = self._dense_base() + (delta.T if self.fan_in_fan_out else delta)
        return torch.linalg.vector_norm(weight, dim=1)

    def _dora_forward(self, rows: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``W'·x + bias`` as PEFT computes it: the base output rescaled, plus the rescaled update."""
        modules = self._modules
        A, B = modules["lora_A"].weight, modules["lora_B"].weight
        x = dropout(rows, self.dropout) if self.dropout and self.training else rows
        norm = self._row_norm(self.delta_weight().detach()).detach()  # a constant in backward (section 4.3)
        scale = (self.lora_magnitude_vector / norm).to(result.dtype)
        if x is rows:  # the base output without its bias
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            base = F.linear(x.to(result.dtype), self._dense_base().to(result.dtype))
        update = F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling
        return result + (scale - 1) * base + scale * update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·A`` in the base weight's layout, computed in float32."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float()
        if not self.sliced:
            delta = b @ a
        else:
            blocks = [
                b_i @ a_i for a_i, b_i in zip(a.split(self.r), b.split(self.slice_sizes))
            ]
            delta = a.new_zeros(self.out_features, self.in_features)
            delta.index_copy_(0, self.out_index, torch.cat(blocks))
        delta = delta * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, weight: float = 1.0) -> None:
        """Fold ``weight·scaling·B·A`` into the base weight (the only place an update is
        added to a weight); a second call is a no-op.

        Raises:
            LoraError: a 4-bit or 8-bit base, or an update that makes the weight non-finite
                (the weight is then left as it was).
        """
        if self.merged:
            return
        if is_4bit(self.base_layer):
            raise LoraError(
                "cannot merge in place into a 4-bit weight: re-quantizing would lose the update's "
                "precision. Use unload_lora(model), which writes a dequantized layer instead."
            )
        base = self.base_layer.weight
        if not base.dtype.is_floating_point:
            raise LoraError(f"cannot merge into a {base.dtype} weight (an 8-bit base): use `lorakit merge`, "
                            "which folds the adapter into the full-precision base")
        delta = self.delta_weight()
        merged = base.float() + weight * delta
        if self.use_dora:
            if weight != 1.0:
                raise LoraError("a DoRA adapter cannot be merged at a weight other than 1: its magnitudes "
                                "renormalise the whole weight, so there is no half-strength DoRA")
            self.dora_factor = (self.lora_magnitude_vector.float() / self._row_norm(delta)).detach()
            merged = merged * (self.dora_factor[None, :] if self.fan_in_fan_out else self.dora_factor[:, None])
        if not torch.isfinite(merged).all():
            raise LoraError("merging produced NaN/inf weights: the adapter is broken")
        base.copy_(merged)
        self.merged, self.merged_weight = True, weight

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight; a no-op when not merged."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        current = weight.float()
        if self.use_dora:
            current = current / (self.dora_factor[None, :] if self.fan_in_fan_out else self.dora_factor[:, None])
        weight.copy_(current - self.merged_weight * self.delta_weight())
        self.merged = False

    def merged_linear(self) -> nn.Module:
        """The base layer with the update folded in, as a plain layer.

        A 4-bit base is first replaced by an ``nn.Linear`` holding its dequantized weight
        (in the layer's compute dtype; nothing is re-quantized), then merged like any other.
        """
        if not is_4bit(self.base_layer):
            self.merge()
            return self.base_layer
        dtype = self.base_layer.compute_dtype or torch.float32
        self.base_layer = dense_linear(self.base_layer)  # float32: the update is added before any rounding
        self.merge()
        return self.base_layer.to(dtype)

    def extra_repr(self) -> str:
        slices = f", slices={len(self.slice_sizes)}" if self.sliced else ""
        init = ", from the base weight" if self.initial is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{slices}{', dora' if self.use_dora else ''}{init}"

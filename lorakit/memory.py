"""Training memory, estimated before a run and measured during one.

The estimate never allocates: the model is built from its config under PyTorch's
``FakeTensorMode`` (tensors with shapes and dtypes but no data), LoRA is added, and
one forward and backward pass runs at the configured batch and length while
``LiveTensorBytes`` counts the bytes of every tensor alive at each moment. The peak
of that pass, minus the weights it touched, is the activation memory (once without
and once with gradient checkpointing). Weights, adapters, gradients and optimizer
states are counted exactly from parameter shapes and dtypes, with 4-bit weights at
their packed size.

The measurement runs real training steps. On a GPU it reads the CUDA allocator's
peak; on the CPU, which has no allocator statistics, the same ``LiveTensorBytes``
counter watches the real run. Both start at the first forward pass.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from lorakit.activation_memory import keep_less
from lorakit.attention import use_fast_backward
from lorakit.config import Config
from lorakit.inject import add_lora
from lorakit.loss import CausalLMLoss, head_loss
from lorakit.model import enable_checkpointing, load_model_config, resolve_dtype

# bitsandbytes 4-bit: half a byte per weight, one float32 absmax per 64 weights; with
# double quantization the absmax is itself 8-bit (plus a float32 per 256 of those).
_BLOCK = 64


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by live tensors, and their peak, while the mode is active.

    Every tensor an operation reads or writes is counted once (by storage) until it is
    freed; tensors that exist before the mode starts count from their first use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
            return
        key = id(storage)
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_, key: int = key, size: int = size) -> None:
            self._alive.pop(key, None)
            self.current -= size

        self._alive[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, out))[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training run's memory."""

    weights: int  # the frozen base (packed when quantized)
    adapters: int  # trainable parameters
    gradients: int
    optimizer: int  # optimizer states
    activations: int  # saved for backward, plus the pass's transient peak
    activations_checkpointed: int  # the same with gradient checkpointing
    checkpointing: bool  # what the config asks for
    shared_prefix: int  # leading tokens of the heaviest batch computed once (without checkpointing)
    trainable_params: int
    total_params: int

    def total(self, checkpointing: bool | None = None) -> int:
        """Peak bytes of a training step, with or without gradient checkpointing."""
        on = self.checkpointing if checkpointing is None else checkpointing
        activations = self.activations_checkpointed if on else self.activations
        return self.weights + self.adapters + self.gradients + self.optimizer + activations


def _weight_bytes(model: torch.nn.Module, cfg: Config) -> int:
    """Frozen parameters at their loaded size: packed for 4-bit and 8-bit bases."""
    q = cfg.model.quantization
    quantized = set()
    if q is not None:
        head = model.get_output_embeddings()
        quantized = {id(m.weight) for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad}
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        n = param.numel()
        if id(param) not in quantized:
            # quantized bases keep their other weights in float32 (see model.load_model)
            total += n * (4 if q is not None else param.element_size())
        elif q.bits == 8:
            total += n + 4 * param.shape[0]  # int8 plus one float32 scale per row
        else:
            absmax = n // _BLOCK * (1 + 4 / 256) if q.double_quant else n // _BLOCK * 4
            total += n // 2 + int(absmax)
    return total


def _optimizer_bytes(trainable: list[torch.nn.Parameter], optimizer: str) -> int:
    if optimizer == "adamw":  # two states in the parameter's dtype
        return sum(2 * p.numel() * p.element_size() for p in trainable)
    n = sum(p.numel() for p in trainable)
    return 2 * n + 2 * 4 * (n // 256 + 1)  # 8-bit states with a float32 absmax per 256


def _activation_peak(loss_model: CausalLMLoss, batch_size: int, length: int, trained_rows: int,
                     autocast: torch.dtype | None, shared: int) -> int:
    """Peak bytes of one forward and backward pass, beyond the weights it reads."""
    model = loss_model.model
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    counter = LiveTensorBytes()
    with counter, torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if loss_model.sparse:
            # as the training loss computes it (lorakit.loss): the shared prefix once, then only
            # labelled positions through the head (here, the first ones)
            hidden = loss_model.hidden(ids, mask, start=shared).flatten(0, 1)
            trained_rows = min(trained_rows, hidden.shape[0])
            rows = hidden[torch.arange(trained_rows)]
            loss = head_loss(model.get_output_embeddings(), rows, torch.zeros(trained_rows, dtype=torch.long))
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(0, counter.peak - weights)


def estimate_memory(cfg: Config, batch_size: int, length: int, trained_rows: int, shared: int = 0) -> MemoryEstimate:
    """The memory a training step of ``cfg`` needs, computed without allocating it.

    Args:
        cfg: the run's config (model, LoRA, quantization, optimizer, precision).
        batch_size: sequences per micro-batch.
        length: tokens per sequence (the longest batch's length).
        trained_rows: positions per micro-batch that carry a loss (at most
            ``batch_size × (length - 1)``).
        shared: leading tokens every row of the batch has, which training computes once
            (``lorakit.prefix``) where the model and config allow.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision)
    rows = min(trained_rows, batch_size * (length - 1))
    with FakeTensorMode():
        # in the model's dtype even for a 4-bit base: its layers return their input's dtype,
        # whatever quantization.compute_dtype their matmuls run in, so the activations keep it
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.model, cfg.trains_whole_weights),
                                                 trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.quantization is None:  # as training does (4-bit MLPs stay as they are: counted whole here)
            keep_less(model)
        if cfg.method == "lora":
            add_lora(model, cfg.lora)
        use_fast_backward(model, "cuda" if torch.cuda.is_available() else "cpu", model.dtype)  # as training does
        model.train()
        for param in model.parameters():
            if param.requires_grad:  # gradients are counted apart: keep only their transient
                param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        loss_model = CausalLMLoss(model)
        if cfg.training.compile or not loss_model.may_share(torch.ones(batch_size, length)):
            shared = 0
        activations = _activation_peak(loss_model, batch_size, length, rows, autocast, shared)
        enable_checkpointing(model)
        checkpointed = _activation_peak(loss_model, batch_size, length, rows, autocast, 0)  # never shares
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return MemoryEstimate(
        weights=_weight_bytes(model, cfg),
        adapters=trainable_bytes,
        gradients=trainable_bytes,
        optimizer=_optimizer_bytes(trainable, cfg.training.optimizer),
        activations=activations,
        activations_checkpointed=checkpointed,
        checkpointing=cfg.model.gradient_checkpointing,
        shared_prefix=shared,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def measure_peak(cfg: Config, steps: int) -> int:
    """Peak bytes of ``steps`` real training steps of ``cfg`` (one process, no
    validation, no checkpoints, output to a temporary directory), starting with the
    heaviest batch: the longest examples, grouped by length.

    Counting starts at the first forward pass: loading (a 4-bit base passes through
    full precision) is not training memory.
    """
    from lorakit.batching import heaviest_batch_first
    from lorakit.train import train

    cuda = torch.cuda.is_available()
    counter = LiveTensorBytes()

    def start(module, args) -> None:
        hook.remove()  # once is enough; a global hook left in place would slow every module call
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        counter.peak = counter.current

    hook = torch.nn.modules.module.register_module_forward_pre_hook(start)
    with tempfile.TemporaryDirectory(prefix="lorakit-measure-") as tmp:
        run = cfg.model_copy(deep=True)
        run.data.validation = None
        run.data.group_by_length = True
        run.training = run.training.model_copy(update={
            "max_steps": steps, "epochs": None, "save_every": None, "eval_every": None, "output_dir": tmp})
        try:
            with heaviest_batch_first():
                if cuda:
                    train(run)
                    return torch.cuda.max_memory_allocated()
                with counter:
                    train(run)
            return counter.peak
        finally:
            hook.remove()

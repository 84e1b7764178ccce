"""``lorakit train`` under Accelerate's FSDP2 on CPU processes (gloo), for the tests.

Accelerate turns FSDP on only for GPU runs, while torch's FSDP2 itself runs on the CPU.
This launcher sets Accelerate's state to what ``configs/accelerate/fsdp.yaml`` gives on
GPUs, so the whole sharded path (Accelerate's ``prepare``, gathering for saving,
resharding on resume) runs in CI. Run with torchrun: ``torchrun --nproc_per_node 2
tests/fsdp_on_cpu.py train CONFIG``.
"""

import sys

from accelerate import Accelerator
from accelerate import state as accelerate_state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

_init = accelerate_state.AcceleratorState.__init__
_prepare = Accelerator.prepare


def _fsdp_state(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.FSDP:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin(  # as configs/accelerate/fsdp.yaml
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def _reporting_prepare(self, *args):
    prepared = _prepare(self, *args)
    sharded = [n for n, p in prepared[0].named_parameters() if isinstance(p, DTensor)]
    if self.is_main_process:
        print(f"sharded parameters: {len(sharded)}", file=sys.stderr)
    return prepared


if __name__ == "__main__":
    accelerate_state.AcceleratorState.__init__ = _fsdp_state
    Accelerator.prepare = _reporting_prepare
    from lorakit.cli import main

    main(sys.argv[1:])

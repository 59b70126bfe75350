"""TEST-ONLY shim: keep accelerate's FSDP plugin on a machine without a GPU. Never in the library.

accelerate 1.15 promotes the state to FSDP only when the processes sit on GPUs (and similar devices);
on CPU (MULTI_CPU) it drops the plugin without a word and the student trains under DDP. FSDP2
itself runs on CPU with gloo, so tests put the promotion back for MULTI_CPU, in every process,
before the first `Accelerator` is built.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def keep_fsdp_on_cpu() -> None:
    original_init = AcceleratorState.__init__
    if getattr(original_init, "keeps_fsdp_on_cpu", False):
        return

    def init(
        self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None, **kwargs
    ):
        original_init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.keeps_fsdp_on_cpu = True
    AcceleratorState.__init__ = init

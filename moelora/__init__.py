"""moelora: mixture-of-LoRA-experts routing on frozen Hugging Face models.

    import moelora
    cfg = moelora.MoELoRAConfig(target_modules=["query", "value"], num_experts=8, top_k=2)
    model = moelora.inject(hf_model, cfg)
    loss = model(**batch).loss + moelora.aux_loss(model)
    moelora.save_adapter(model, "out/")

Nothing here imports triton: the Triton kernels load on first use, so ``import moelora`` works on
machines without triton or a GPU.

Docstrings cite the project's design notes as "design §N" and "research/<file>.md §N": those are
``../shared/design.md`` and ``../shared/research/`` beside the repository, not files in it.
"""

import sys as _sys

from .tracker import LayerStats, LoadTracker
from .checkpointing import checkpoint
from .config import MoELoRAConfig, config_from_dict, register_config
from .experts import ExpertBank
from .inject import aux_loss, disable_adapters, inject, routing_stats, trainable_parameters, unwrap
from .io import load_adapter, save_adapter
from .layer import MoELoRALinear, wrapped_layers
from .routers import Routing, SiRARouter, TopKRouter
from .methods import SiRAConfig

__version__ = "0.1.0"

__all__ = [
    "ExpertBank", "LayerStats", "LoadTracker", "MoELoRAConfig", "MoELoRALinear", "Routing", "TopKRouter",
    "SiRAConfig", "SiRARouter",
    "aux_loss", "checkpoint", "config_from_dict", "disable_adapters", "inject", "load_adapter", "register_config",
    "routing_stats", "save_adapter", "trainable_parameters", "unwrap", "wrapped_layers",
]

# MeteoRA: PEFT LoRA adapters fused as routed experts; export back to PEFT.
from .lora_export import collapse_lora_adapters, export_lora_adapters
from .methods.meteora import MeteoRAConfig, from_lora_adapters, select_experts, set_task_ids

__all__ += ["MeteoRAConfig", "collapse_lora_adapters", "export_lora_adapters", "from_lora_adapters",
            "select_experts", "set_task_ids"]

# FlyLoRA: rank-wise implicit MoE with a frozen sparse random A; task adapters merge by averaging B.
from .merge import merge_into_base
from .methods.flylora import FlyLoRAConfig, FlyLoRALinear
from .methods.flylora_merge import merge_flylora
from .routers.flylora import FlyLoRARouter

__all__ += ["FlyLoRAConfig", "FlyLoRALinear", "FlyLoRARouter", "merge_flylora", "merge_into_base"]

# MoA: heterogeneous Mixture of Adapters (soft and sparse) with a sigmoid router per block.
from .methods.moa import MoAConfig, moa_stats
from .methods.moa_block import MoABlock
from .methods.moa_experts import MoALoRALinear, ParallelAdapter, PromptExpert
from .routers.moa import MoAGates, MoARouter

__all__ += ["MoABlock", "MoAConfig", "MoAGates", "MoALoRALinear", "MoARouter", "ParallelAdapter", "PromptExpert",
            "moa_stats"]

# WeightLoRA / WeightLoRA+: a trainable weight per head (or expert), kept K-sparse, then pruned.
from .methods import weightlora

_sys.modules[f"{__name__}.weightlora"] = weightlora  # `import moelora.weightlora`, as README writes it
from .methods.weightlora import WeightLoRAController, add_gates
from .methods.weightlora_config import WeightLoRAConfig

__all__ += ["WeightLoRAConfig", "WeightLoRAController", "add_gates", "weightlora"]

"""Expert compute for moelora (installed as ``moelora.kernels``).

Public ops (one ``autograd.Function`` each, ``backend="auto" | "torch" | "triton"``):

    gated_lora     explicit token routing over a rank-major bank (dense-gated; grouped above
                   DENSE_MAX_RANK)
    rankwise_lora  FlyLoRA: r rank-1 experts, top-k from h = A x inside the kernel
    grouped_lora   sorted grouped path for large E·r, with a RoutingPlan

``reference`` holds the torch twins (oracle and CPU path). Triton kernels import lazily (first
use of the Triton backend), so this package works without triton.
"""

from . import reference
from .grouped import RoutingPlan, build_routing_plan, grouped_lora
from .ops import BACKENDS, DENSE_MAX_RANK, gated_lora, resolve_backend, triton_available
from .rankwise import rankwise_lora

__all__ = ["BACKENDS", "DENSE_MAX_RANK", "RoutingPlan", "build_routing_plan", "gated_lora", "grouped_lora",
           "rankwise_lora", "reference", "resolve_backend", "triton_available"]

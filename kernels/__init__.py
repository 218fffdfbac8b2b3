"""Expert compute for moelora (installed as ``moelora.kernels``).

Public ops (one ``autograd.Function`` each, ``backend="auto" | "torch" | "triton"``):

    gated_lora     explicit token routing over a rank-major bank (dense-gated; grouped above
                   DENSE_MAX_RANK)
    rankwise_lora  FlyLoRA: r rank-1 experts, top-k from h = A x inside the kernel
    grouped_lora   sorted grouped path for large E·r, with a RoutingPlan

``reference`` holds the torch twins (oracle and CPU path). Triton kernels import lazily (first
use of the Triton backend), so this package works without triton.
"""

if __name__ == "moelora.kernels":
    from . import reference
    from .grouped import RoutingPlan, build_routing_plan, grouped_lora
    from .ops import BACKENDS, DENSE_MAX_RANK, gated_lora, resolve_backend, triton_available
    from .rankwise import rankwise_lora

    __all__ = ["BACKENDS", "DENSE_MAX_RANK", "RoutingPlan", "build_routing_plan", "gated_lora", "grouped_lora",
               "rankwise_lora", "reference", "resolve_backend", "triton_available"]
else:
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m pytest``
    # from the root) and transformers probes for Hugging Face's ``kernels`` package by importing
    # that name. Executing the submodules a second time would register the ``moelora::`` custom
    # ops again and leave the first registrations dangling (intermittent crashes in the
    # dispatcher), so this copy stays an empty shell. transformers then sees no version and
    # treats HF ``kernels`` as absent, which is true.
    __all__ = []

"""Triton kernels for moelora (imported only when the Triton backend is resolved).

Modules:
    ``dense``    shrink, gate_expand (routed or in-kernel top-k gate), xty, gate_grad
    ``grouped``  the sorted grouped path for large ``E·r`` (shrink / expand / xty over a RoutingPlan)
    ``library``  ``torch.library.custom_op`` wrappers with fake impls, so ``torch.compile`` traces them

Importing this package imports ``triton``. On a CPU-only machine, set ``TRITON_INTERPRET=1`` before
the first ``import triton`` to run these kernels in the interpreter (small shapes, CPU tensors).
"""

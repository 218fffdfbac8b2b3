"""The `moelora` console script: every shipped YAML validates and trains a few steps; errors name the field."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import moelora

from moelora.cli import build_cli, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
FAST = ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--data.batch_size=4", "--data.suite_train_per_task=2", "--data.suite_val_per_task=1"]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "moelora.yaml", "sira.yaml", "flylora.yaml", "meteora.yaml"} <= names


@pytest.fixture(scope="session")
def suite_loras(tmp_path_factory):
    """configs/meteora.yaml fuses loras/<task> PEFT adapters: make tiny ones once (1 step each)."""
    from moelora.suite_loras import make_suite_loras

    out = tmp_path_factory.mktemp("suite") / "loras"
    make_suite_loras(out, steps=1, examples=2, batch_size=2)
    return out


def _in_run_dir(config, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    if config.name == "meteora.yaml":
        (tmp_path / "loras").symlink_to(request.getfixturevalue("suite_loras"), target_is_directory=True)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch, request):
    _in_run_dir(config, tmp_path, monkeypatch, request)
    cli = build_cli(["-c", str(config), "--trainer.logger=false"], run=False)
    method = cli.model.method
    declared = yaml.safe_load(config.read_text())["model"]["method"]
    assert f"{type(method).__module__.split('.')[0]}.{type(method).__name__}" == declared["class_path"]
    for key, value in declared.get("init_args", {}).items():
        assert getattr(method, key) == value, key


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_fits_a_few_steps(config, tmp_path, monkeypatch, capsys, request):
    _in_run_dir(config, tmp_path, monkeypatch, request)
    main(["fit", "-c", str(config), *FAST])
    out = capsys.readouterr().out
    assert "moelora fit finished" in out
    assert (tmp_path / "runs" / "tensorboard" / "version_0" / "adapter" / "moelora_model.safetensors").is_file()
    assert (tmp_path / "runs" / "tensorboard" / "version_0" / "routing_stats.json").is_file()
    metrics = (tmp_path / "runs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in metrics and "train/aux_loss" in metrics and "routing/mean_entropy" in metrics


def test_a_meteora_checkpoint_loads_without_its_lora_directories(tmp_path, monkeypatch, capsys, request):
    # The checkpoint holds every expert weight; the YAML's relative `loras/<task>` paths must not
    # be needed again (another working directory, moved folders).
    from moelora.lightning import MoELoRAModule

    meteora = [p for p in CONFIGS if p.name == "meteora.yaml"][0]
    _in_run_dir(meteora, tmp_path, monkeypatch, request)
    main(["fit", "-c", str(meteora), *FAST])
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    (tmp_path / "loras").unlink()
    monkeypatch.chdir(tmp_path / "runs")
    module = MoELoRAModule.load_from_checkpoint(ckpt, weights_only=True)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    banks = {k: v for k, v in module.state_dict().items() if ".bank." in k}
    assert banks and all(torch.equal(v, saved[k]) for k, v in banks.items())
    assert len(moelora.wrapped_layers(module.model)) == len(module.hparams["adapter_layout"])
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert torch.isfinite(module.eval()(batch).logits).all()


def test_print_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS[0]), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"]["class_path"] == "moelora.MoELoRAConfig"
    assert printed["model"]["backbone"] == "minilm"
    assert "tokenizer" not in printed["data"], "data.tokenizer is linked to model.backbone, not set twice"


@pytest.mark.parametrize("override,field", [
    ("--model.method.init_args.top_k=9", "top_k"),
    ("--model.method.init_args.rank=0", "rank"),
    ("--data.batch_size=0", "batch_size"),
    ("--model.method.init_args.num_expert=4", "['num_expert'] is no field"),  # a typo, not "method None"
    # jsonargparse drops the YAML's class_path on a wrong-typed override: the value is named, not the field
    ("--model.method.init_args.top_k=two", "wrong type: top_k='two' (expected int)"),
    # a missing local backbone, not the hub client's "Repo id must use alphanumeric chars"
    ("--model.backbone=./nope_model", "model.backbone='./nope_model' is no directory"),
    # a bad class path as an override: jsonargparse's own error was a bare AttributeError
    ("--model.method.class_path=moelora.SiraConfig", "'moelora.SiraConfig' is not a moelora method config"),
    ("--model.method.class_path moelora.Nope", "'moelora.Nope' is not a moelora method config"),
])
def test_bad_value_fails_naming_the_field(tmp_path, override, field):
    demo = [p for p in CONFIGS if p.name == "demo.yaml"][0]
    proc = subprocess.run([sys.executable, "-m", "moelora.cli", "fit", "-c", str(demo), *override.split(" "),
                           "--trainer.max_steps=1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert field in proc.stderr
    if "--model." in override:  # refused while the model is built: one line, no traceback pages
        assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr


def test_predict_writes_routing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = [p for p in CONFIGS if p.name == "demo.yaml"][0]
    main(["predict", "-c", str(demo), "--data.suite_val_per_task=1", "--data.batch_size=4",
          "--prediction_writer.output=preds.jsonl"])
    import json

    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    row = rows[0]
    assert row["prediction"] in (0, 1) and row["tokens"][0] == "[CLS]"
    layer = next(iter(row["routing"].values()))
    assert len(layer) == len(row["input_ids"]) and all(len(slots) == 2 for slots in layer)


def test_extra_commands_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "import-lora" in capsys.readouterr().out


def test_readme_yaml_example_parses_and_trains_its_head(tmp_path, monkeypatch):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Training from the command line.*?```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "readme.yaml").write_text(block)
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["-c", "readme.yaml", "--trainer.logger=false"], run=False)
    assert type(cli.model.method).__name__ == "SiRAConfig"
    assert cli.model.method.modules_to_save == ["classifier"]


@pytest.mark.parametrize("config", [p for p in CONFIGS if "with its default" in p.read_text()], ids=lambda p: p.name)
def test_configs_that_list_defaults_note_every_other_value(config):
    # sira.yaml once said "listed with its default" over num_experts: 8, rank: 4, alpha: 8.0
    # (defaults 4, 8, 16) without a word: a reader copying it learnt three wrong defaults.
    import dataclasses

    from moelora.config import method_class

    text = config.read_text()
    method = yaml.safe_load(text)["model"]["method"]
    fields = {f.name: f for f in dataclasses.fields(method_class(method["class_path"]))}
    for key, value in method["init_args"].items():
        default = fields[key].default
        if default is dataclasses.MISSING or default is None or default == value:
            continue  # no default to mislead about (targets, seed, the adapters to fuse)
        line = re.search(rf"^\s+{key}:.*$", text, re.M).group(0)
        assert re.search(r"#.*default", line), f"{config.name}: {key}: {value} differs from the default " \
                                               f"{default!r}; say so on its line ({line.strip()!r})"


def test_default_root_dir_moves_the_run_and_resume_names_replaced_overrides(tmp_path, monkeypatch, capsys):
    # The default loggers once kept save_dir "runs", so --trainer.default_root_dir moved nothing.
    monkeypatch.chdir(tmp_path)
    demo = [p for p in CONFIGS if p.name == "demo.yaml"][0]
    root = tmp_path / "elsewhere"
    main(["fit", "-c", str(demo), *FAST, f"--trainer.default_root_dir={root}"])
    run = root / "tensorboard" / "version_0"
    assert (run / "adapter" / "moelora_model.safetensors").is_file() and (run / "routing_stats.json").is_file()
    assert (root / "csv" / "version_0" / "metrics.csv").is_file() and not (tmp_path / "runs").exists()
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    resume = ["fit", "-c", str(demo), *FAST, "--trainer.max_steps=3", f"--trainer.default_root_dir={root}",
              f"--ckpt_path={ckpt}"]
    with pytest.warns(UserWarning, match=r"model.method.num_experts: given 8, checkpoint 4"):
        main([*resume, "--model.method.init_args.num_experts=8"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(resume)
    assert not [w for w in caught if "checkpoint's model settings" in str(w.message)], "nothing was overridden"


def test_meteora_config_without_its_loras_names_the_command_that_makes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    meteora = [p for p in CONFIGS if p.name == "meteora.yaml"][0]
    assert main(["fit", "-c", str(meteora), "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "moelora: error: adapter 'topic'" in err and "moelora suite-loras -o" in err


def test_progress_bar_can_be_turned_off(tmp_path, monkeypatch):
    # The default RichProgressBar once made Lightning refuse --trainer.enable_progress_bar=false.
    from lightning.pytorch.callbacks import ProgressBar

    monkeypatch.chdir(tmp_path)
    demo = [p for p in CONFIGS if p.name == "demo.yaml"][0]
    cli = build_cli(["-c", str(demo), "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
    assert not [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]

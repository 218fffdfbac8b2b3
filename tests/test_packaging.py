"""The package installs and imports as documented, and the README's commands are what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_without_triton():
    # A None entry in sys.modules makes `import triton` raise ImportError, as on a machine without it.
    code = ("import sys; sys.modules['triton'] = None; import moelora, moelora.kernels, moelora.routers; "
            "import torch; from moelora.kernels import resolve_backend; "
            "print(resolve_backend('auto', torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_import_leaves_triton_and_dynamo_unimported():
    # Importing triton fixes TRITON_INTERPRET for the process, and torch._dynamo imports triton:
    # a script that sets the variable after `import moelora` (benchmarks/kernels.py) must still get
    # the interpreter. torch.compiler.disable as a decorator at import time once broke this.
    code = ("import sys, moelora, moelora.kernels, moelora.routers, moelora.methods; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kernels_and_routers_live_under_moelora():
    import moelora.kernels
    import moelora.routers

    assert Path(moelora.kernels.__file__).parent == ROOT / "kernels"
    assert Path(moelora.routers.__file__).parent == ROOT / "routers"


def test_every_package_directory_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"moelora": ROOT / "moelora", "moelora.kernels": ROOT / "kernels", "moelora.routers": ROOT / "routers"}
    found = set()
    for prefix, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((prefix, *rel)))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = readme_commands()
    assert main_cmd.startswith("python3 -m pip install torch==2.13.0") and "moelora fit -c configs/demo.yaml" in main_cmd
    assert test_cmd.startswith("python3 -m pip install torch==2.13.0") and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_demo_runs(capsys):
    from moelora import demo

    demo.main(["--steps", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "round trip: max |logit difference| = 0.00e+00" in out


def test_every_shipped_config_is_package_data_and_found_by_name(tmp_path, monkeypatch, capsys):
    # Installed from a wheel there is no configs/ directory beside the user: `-c configs/demo.yaml`
    # and `-c demo` must still find the shipped copy.
    import tomllib
    from importlib import resources

    from moelora.cli import _resolve_configs, shipped_config

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "moelora.configs" in meta["packages"] and meta["package-data"]["moelora.configs"] == ["*.yaml"]
    shipped = {p.name for p in resources.files("moelora.configs").iterdir() if p.name.endswith(".yaml")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    monkeypatch.chdir(tmp_path)
    assert shipped_config("configs/sira.yaml") == shipped_config("sira") == shipped_config("sira.yaml")
    assert shipped_config("nope") is None
    argv = _resolve_configs(["fit", "-c", "configs/demo.yaml", "--config=flylora", "-c", "missing.yaml"])
    assert argv[2] == shipped_config("demo") and argv[3] == f"--config={shipped_config('flylora')}"
    assert argv[5] == "missing.yaml", "an unknown name is left for the CLI's own error"
    assert "using the shipped config" in capsys.readouterr().err
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("seed_everything: 1\n")
    assert _resolve_configs(["fit", "-c", "configs/demo.yaml"])[2] == "configs/demo.yaml", "a local file wins"
    (tmp_path / "demo").mkdir()  # a folder of that name is no config: `-c demo` once failed on it
    assert _resolve_configs(["fit", "-c", "demo"])[2] == shipped_config("demo")


def test_readme_tour_runs_and_does_what_its_comments_say(tmp_path, monkeypatch, minilm_tokenizer):
    # The tour once said load_adapter returns a frozen eval-mode model while its call left the
    # default trainable=True: run the block itself, on the real MiniLM, and check its claims.
    import torch

    import moelora
    from conftest import minilm_classifier

    block = re.search(r"## Tour\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    loading, rest = block.split("with moelora.disable_adapters")
    batch = minilm_tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    fresh = minilm_classifier()
    fresh_requires_grad = {n: p.requires_grad for n, p in fresh.named_parameters()}
    scope = {"hf_model": minilm_classifier(), "fresh_hf_model": fresh, "batch": batch, "labels": torch.tensor([0, 1])}
    monkeypatch.chdir(tmp_path)
    exec(compile(loading, "README.md#tour", "exec"), scope)
    assert scope["loss"].requires_grad and scope["stats"].enabled is False
    assert (tmp_path / "out" / "moelora_config.json").is_file()
    loaded = scope["model"]
    assert loaded is fresh and moelora.wrapped_layers(loaded) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters()), "frozen, as the comment says"
    exec(compile("with moelora.disable_adapters" + rest, "README.md#tour", "exec"), scope)
    assert not moelora.wrapped_layers(loaded)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == fresh_requires_grad


def test_weightlora_imports_by_the_path_the_readme_writes():
    # moelora.weightlora worked as an attribute only: `from moelora.weightlora import ...` failed.
    code = "from moelora.weightlora import param_groups, hard_threshold; import moelora.weightlora; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

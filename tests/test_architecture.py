"""The package's shape: imports flow one way, the kernels are a leaf installed as latentrt.kernels only."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "latentrt"

# layers from the leaf up: a module may import its own layer and the ones below, never above
LAYERS = [
    ("kernels", "_cuda"),
    (
        "errors",
        "caller",
        "config",
        "cache",
        "kv_modes",
        "kv_pool",
        "exits",
        "recurrence",
        "hooks",
        "sampling",
        "dry",
        "penalties",
        "choices",
        "structured",
        "token_constraints",
        "logprobs",
        "stop_strings",
        "sequence_text",
        "chat",
        "prompts",
        "tokenizer",
        "records",
        "options",
        "checkpoint",
        "hub",
        "memory",
        "cuda_ext",
        "cuda_sources",
        "transfer",
        "version",
    ),
    ("backends",),
    ("models", "decode", "families", "distributions", "lora", "lora_serving"),
    ("engine", "loader", "evaluate"),
    ("cli", "cli_flags", "serve", "train", "__init__", "__main__"),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, path.relative_to(PKG)


def _imported(path: Path, rel: Path) -> set[str]:
    """Top-level latentrt subpackages/modules a file imports (absolute or relative, lazy ones included)."""
    out = set()
    package = ["latentrt", *rel.parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:
                    names = [".".join(base + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "latentrt" and len(parts) > 1:
                out.add(parts[1])
            elif parts[0] == "latentrt":
                out.add("__init__")
    return out


def test_imports_flow_one_way():
    wrong = []
    for path, rel in _modules():
        own = rel.parts[0].removesuffix(".py")
        if own not in LEVEL:
            wrong.append(f"{rel}: not placed in a layer")
            continue
        for dep in _imported(path, rel):
            if dep != own and LEVEL.get(dep, 99) > LEVEL[own]:
                wrong.append(f"{rel} imports latentrt.{dep} (layer {LEVEL.get(dep)} above its layer {LEVEL[own]})")
    assert not wrong, "\n".join(wrong)


def test_kernels_import_nothing_above_them():
    for path in sorted((PKG / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from above its package"
                assert node.level or not (node.module or "").startswith("latentrt"), f"{path.name}: {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("latentrt") for a in node.names), path.name


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("where", ["outside", "repository root"])
def test_no_top_level_kernels_module(tmp_path, where):
    """'kernels' is another project's name on the index (transformers probes for it, and from 5.25 installs
    it): latentrt installs nothing of that name and none sits in the repository root, from where the tests
    and benchmarks run, so `import kernels` finds that project or nothing; 'latentrt.kernels' is the package."""
    cwd = tmp_path if where == "outside" else ROOT
    res = _python("import latentrt.kernels, latentrt.kernels.linear; print(latentrt.kernels.FAMILIES)", cwd)
    assert res.returncode == 0, res.stderr
    res = _python("import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)", cwd)
    assert res.returncode == 0, res.stderr
    origin = res.stdout.strip()
    if origin != "None":  # another project's module: never one inside this repository
        assert ROOT not in Path(origin).resolve().parents, origin
        res = _python("import importlib.metadata as m; print(m.distribution('kernels').metadata['Name'])", cwd)
        assert res.returncode == 0 and res.stdout.strip() == "kernels", res.stderr


@pytest.mark.parametrize("tool", ["tools.compile_check"])
def test_developer_tools_live_outside_the_package(tool):
    assert not (PKG / "kernels" / "compile_check.py").exists()
    assert (ROOT / Path(*tool.split("."))).with_suffix(".py").is_file()


FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "as_tensor", "arange", "randn", "rand", "randint", "randperm"}
# where torch's defaults are meant: modules' parameters (nn's convention; load builds them on the meta device
# and sets the dtype) and the kernels' random test inputs (a CPU generator's draws, moved by the caller)
DEFAULTS_MEANT = {"__init__", "make_inputs", "slot_table"}


def test_tensors_name_their_device():
    """Every torch factory call in the package names its device (and so neither torch.set_default_device nor
    a ``with torch.device(...)`` block moves latentrt's tensors; tests/test_torch_defaults.py runs it)."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name in DEFAULTS_MEANT:
                continue
            for node in ast.walk(fn):
                call = node if isinstance(node, ast.Call) else None
                if call is None or not isinstance(call.func, ast.Attribute) or call.func.attr not in FACTORIES:
                    continue
                if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
                    if "device" not in {k.arg for k in call.keywords}:
                        found.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.{call.func.attr} in {fn.name}")
    assert not found, "factory calls without device=:\n" + "\n".join(sorted(set(found)))

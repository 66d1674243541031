"""The layer rules of DESIGN §2: `ernie/` stands alone (PyTorch + safetensors; Triton, lazily, for CUDA kernels)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERNIE_ALLOWED_THIRD_PARTY = {"torch", "safetensors", "triton"}
"""triton: the GPU kernels' compiler, shipped with CUDA builds of torch (imported lazily, only for CUDA inputs)."""
FORBIDDEN_EVERYWHERE_IN_ERNIE = {"pipeline", "stages", "ray", "mlflow", "hydra", "omegaconf", "transformers"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_ernie_imports_only_torch_safetensors_and_the_stdlib():
    for path in sorted((ROOT / "ernie").rglob("*.py")):
        roots = _imported_roots(path)
        assert not roots & FORBIDDEN_EVERYWHERE_IN_ERNIE, f"{path.name} imports {roots & FORBIDDEN_EVERYWHERE_IN_ERNIE}"
        third_party = {r for r in roots if r not in sys.stdlib_module_names and r != "ernie"}
        assert third_party <= ERNIE_ALLOWED_THIRD_PARTY, (
            f"{path.name} imports {third_party - ERNIE_ALLOWED_THIRD_PARTY}"
        )


def test_importing_ernie_pulls_in_no_orchestration_library():
    code = (
        "import sys, ernie, ernie.checkpoint; "
        "bad = [m for m in ('ray', 'mlflow', 'hydra', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == ""


STAGE_ALLOWED_PIPELINE = {"pipeline.contract", "pipeline.formats", "pipeline.shards"}
LIBRARIES = {"training", "imaging"}  # shared by stages, not stages themselves


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_stages_import_only_ernie_the_contract_and_shared_libraries():
    for package in sorted(p for p in (ROOT / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"):
        for path in sorted(package.rglob("*.py")):
            for name in _imported_modules(path):
                parts = name.split(".")
                if parts[0] == "pipeline":
                    assert name in STAGE_ALLOWED_PIPELINE, f"{path.relative_to(ROOT)} imports {name}"
                if parts[0] == "stages" and len(parts) > 1:
                    assert parts[1] in (package.name, *LIBRARIES), f"{path.relative_to(ROOT)} imports {name}"


def test_contract_imports_no_orchestration_library():
    for name in ("contract.py", "formats.py", "shards.py"):
        roots = _imported_roots(ROOT / "pipeline" / name)
        assert not roots & {"ray", "mlflow", "hydra", "omegaconf"}, f"pipeline/{name} imports {roots}"


def test_reading_and_checking_a_config_imports_no_model_library():
    """Every CLI command reads and checks the config first: the stages' config modules import no torch, so a bad
    override is answered, and `run` starts its stages, without a model library in the driver."""
    code = (
        "import sys; from pipeline.config import load; "
        "[load(name, []) for name in ('tiny', 'ernie_21b', 'ernie_vl_28b')]; "
        "import pipeline.runner, pipeline.executor, pipeline.tracking; "
        "print(','.join(m for m in ('torch', 'numpy', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_a_stage_process_needs_no_mlflow():
    """Stages log into the actor's `RelayLogger`; the driver alone writes to the tracking store."""
    for path in sorted((ROOT / "stages").rglob("*.py")) + [ROOT / "pipeline" / "executor.py"]:
        assert "mlflow" not in _imported_roots(path), f"{path.relative_to(ROOT)} imports mlflow"

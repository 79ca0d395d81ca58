"""The layers (docs/layout.md), checked by tools rather than by review: import-linter's
contracts (pyproject.toml, [tool.importlinter]) hold, every module is placed in a layer, the front
ends that need no local model load no llama.cpp, and no module grows past a sitting's reading."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500  # per module: one sitting's reading


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")  # installed by the test extra
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_module_has_a_layer():
    """A new module under spectrum_local/ must be named in the layers contract, or no contract
    would check what it imports."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in config["contracts"] if c["type"] == "layers"
                  and "spectrum_local.cli" in c["layers"])
    placed = set(re.findall(r"spectrum_local\.(\w+)", " ".join(layers)))
    modules = {p.stem if p.is_file() else p.name for p in (ROOT / "spectrum_local").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists())
               and p.name not in ("__init__.py", "__main__.py")}
    assert modules - placed == set()


@pytest.mark.parametrize("module", ["spectrum_local", "spectrum_local.remote",
                                    "spectrum_local.ops", "spectrum_local.batch"])
def test_no_llama_cpp_without_a_local_model(module):
    """connect() and the remote client, the option specs and batch jobs import no llama.cpp:
    the core loads it when it loads a model."""
    code = (f"import sys, {module}\n"
            "print(' '.join(sorted(m for m in sys.modules if m == 'llama_cpp'"
            " or m.startswith(('llama_cpp.', 'spectrum_local.llama')))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.split() == [], f"import {module} loaded {proc.stdout.strip()}"


def test_no_module_over_the_line_limit():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for folder in ("spectrum_local", "convert") for path in (ROOT / folder).rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}

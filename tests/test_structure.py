"""The layout rules a newcomer relies on: the device/server code runs without torch, models/ stands on its
own (no import of pipeline/), the README stays a short guide, and no file names one machine's paths."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm", "torch_pruning")
README_MAX_LINES = 250

# Runs in a fresh interpreter: a sys.meta_path finder makes the blocked packages look uninstalled.
PROBE = r"""
import importlib, json, sys
blocked = set(json.loads(sys.argv[1]))
asked = []

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
importlib.import_module(sys.argv[2])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in blocked and sys.modules[m] is not None)
print(json.dumps({"loaded": loaded, "asked": asked}))
"""


@pytest.mark.parametrize("module", ["pipeline.predict", "serving.service"])
def test_imports_without_torch(module, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEPIPE_", "PYTHON"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", BENTOML_HOME=str(tmp_path / "bentoml"),
               BENTOML_DO_NOT_TRACK="True", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(BLOCKED), module], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"import {module} with {BLOCKED} blocked failed:\n{p.stderr[-2000:]}"
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], result


def _imported_names(tree: ast.AST, package: str):
    """(line, absolute dotted name) of every import in a module of `package` (relative ones resolved),
    plus importlib.import_module / __import__ calls with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # from . import x / from ..pipeline import y, inside models/<file>.py
                parts = package.split(".")[: max(0, len(package.split(".")) - (node.level - 1))]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def test_models_does_not_import_pipeline():
    hits = []
    for path in sorted((ROOT / "models").rglob("*.py")):
        rel = path.relative_to(ROOT)
        package = ".".join(rel.with_suffix("").parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        hits += [f"{rel}:{line} {name}" for line, name in _imported_names(tree, package)
                 if name == "pipeline" or name.startswith("pipeline.")]
    assert hits == [], "models/ must stand on its own (pipeline/ imports models/, not the reverse):\n" + \
        "\n".join(hits)


def test_readme_is_a_short_guide():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; measurements and notes go to docs/"


# An absolute path of one machine: /work/, /tmp/, /home/, /root/, /Users/ not preceded by a character that
# makes it part of something relative or portable (runs/tmp/x, http://host/tmp/, ~/tmp, $HOME/tmp, ${X}/tmp).
MACHINE_PATH = re.compile(r"(?:(?<![A-Za-z0-9_.~$})/-])|(?<=file://))/(?:work|tmp|home|root|Users)/")


def test_no_absolute_machine_paths_in_tracked_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                                timeout=60).stdout.decode("utf-8", "surrogateescape")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    hits = []
    for rel in filter(None, listed.split("\0")):
        path = ROOT / rel
        if "tests" in Path(rel).parts[:-1] or path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue   # binary
        for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert hits == [], "absolute machine paths (use paths relative to the repo or a placeholder):\n" + \
        "\n".join(hits)

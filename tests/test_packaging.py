"""The kernel and benchmark core works without the training stack (pyproject's `train` extra), and a
training entry point without it names the extra.

Each check runs in a fresh interpreter whose import system refuses the training packages and records
every attempt to import one, so an import that is caught and ignored still counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING_STACK = ("diffusers", "transformers", "tokenizers", "av", "scenedetect", "cv2")

BLOCKER = f"""
import atexit, importlib.abc, json, os, sys
attempts = []
class TrainingStackBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_STACK!r}:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (the training stack is blocked)", name=name)
        return None
sys.meta_path.insert(0, TrainingStackBlocker())
atexit.register(lambda: open(os.environ["IMPORT_ATTEMPTS"], "w").write(json.dumps(attempts)))
"""


def _run_blocked(code: str, tmp_path: Path, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``code`` after the blocker; (the process, the training modules it tried to import)."""
    log = tmp_path / "attempts.json"
    env = {**os.environ, "IMPORT_ATTEMPTS": str(log), "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    return done, json.loads(log.read_text()) if log.exists() else ["<the process never reached exit>"]


def _cli(*argv: str) -> str:
    return f"import runpy, sys; sys.argv = ['stdit', *{list(argv)!r}]; runpy.run_module('stdit', run_name='__main__')"


def _module_names() -> list[str]:
    """Every module of the package, from the folders pyproject's package-dir maps (as the layering test reads them)."""
    import tomllib

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    names = []
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.stem == "__main__" or path.stem == "conftest" or path.stem.startswith("test_"):
                continue  # entry points run main() on import; pytest files
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


def test_every_module_imports_without_the_training_stack(tmp_path):
    names = _module_names()
    assert {"stdit.kernels.api", "stdit.models.stdit", "stdit.bench.suites", "stdit.train.trainer"} <= set(names)
    done, attempts = _run_blocked(f"for name in {names!r}: __import__(name)", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert attempts == [], f"importing stdit's modules imported {attempts}"


@pytest.mark.parametrize("argv", [("info",), ("bench", "--list", "--size", "tiny", "--device", "cpu")], ids=" ".join)
def test_cli_runs_without_the_training_stack(argv, tmp_path):
    done, attempts = _run_blocked(_cli(*argv), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
    assert attempts == [], f"`stdit {' '.join(argv)}` imported {attempts}"


def test_training_entry_point_names_the_train_extra(tmp_path):
    (tmp_path / "captions.csv").write_text("path,text\nimage.png,a red circle\n")
    (tmp_path / "stage.toml").write_text(
        '[data]\ncsv = "captions.csv"\nnum_frames = 1\nimage_size = [64, 64]\nbatch_size = 1\n'
        '[encoders]\nvae = "tiny"\ntext = "tiny"\n[run]\nout_dir = "run"\nsteps = 1\ndevice = "cpu"\n'
    )
    done, attempts = _run_blocked(_cli("train", "--config", "stage.toml", "--quiet"), tmp_path, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]  # one line, no traceback
    assert last.startswith("stdit train: error: diffusers could not be imported"), done.stderr[-3000:]
    assert "pip install 'stdit[train]'" in last
    assert "diffusers" in attempts


def test_the_kernels_folder_as_a_top_level_package_imports_nothing():
    """From a checkout's root, `import kernels` finds this repository's folder (transformers probes for
    Hugging Face's `kernels` package so when it loads T5): it must not load a second copy of our kernels,
    whose custom-op registrations would replace stdit.kernels' own."""
    code = ("import sys; sys.path.insert(0, '.'); import stdit.kernels.triton_self_attention as t; import kernels; "
            "assert not [m for m in sys.modules if m.startswith('kernels.')], sorted(sys.modules); "
            "import torch; print(torch.ops.stdit.triton_self_attention.default)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

"""The training stack's packages (pyproject's `train` extra), imported where training first uses them.

The kernels, models and benchmarks install and import without them (GPU images often lack diffusers
and PyAV); a training entry point that needs one says which and how to install it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["MissingTrainDependency", "train_imports"]

INSTALL = "pip install 'stdit[train]'"
# import name -> (what training uses it for, its pip name)
_PACKAGES = {
    "diffusers": ("the VAE (AutoencoderKL) and the DPM-Solver sampler", "diffusers"),
    "transformers": ("the T5 text encoder and its tokenizers", "transformers"),
    "av": ("video decoding and encoding (PyAV)", "av"),
    "scenedetect": ("shot-boundary detection (PySceneDetect; it imports OpenCV: on a server without libGL, "
                    "pip install --no-deps scenedetect opencv-python-headless platformdirs click)", "scenedetect"),
}  # fmt: skip


class MissingTrainDependency(ImportError):
    """A package of the `train` extra is not installed; the message names it and the install command."""


@contextlib.contextmanager
def train_imports(package: str) -> Iterator[None]:
    """Around the imports of ``package`` (e.g. "diffusers", "av"): an ImportError becomes a
    MissingTrainDependency that names the package, what training needs it for and the `train` extra."""
    try:
        yield
    except ImportError as e:
        use, pip_name = _PACKAGES.get(package, ("training", package))
        raise MissingTrainDependency(
            f"{package} could not be imported; training needs it for {use}. Install the training stack with "
            f"{INSTALL} (or pip install {pip_name}). ({type(e).__name__}: {e})"
        ) from e

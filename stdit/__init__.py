"""stdit: kernels, benchmarks and training for Open-Sora 1.0's STDiT.

Subpackages: stdit.kernels, stdit.models, stdit.bench, stdit.train (in the repository's top-level
folders of the same names). This package holds the command-line interface.
"""

__version__ = "0.1.0"

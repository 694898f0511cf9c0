"""stdit.models: STDiT (Open-Sora 1.0), full-attention DiT and Latte on stdit.kernels (issue: models)."""

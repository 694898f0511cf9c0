"""A block never waits on the host: one STDiT block's forward and backward issue no device-to-host
reads (aten::item / aten::_local_scalar_dense), so a GPU runs ahead of Python through every block.
The model checks text lengths once per forward, before the blocks."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from stdit.kernels import availability
from stdit.models import from_preset

HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def _host_reads(fn) -> dict[str, int]:
    """Profiler events that read a tensor on the host, plus Tensor.tolist calls (not an aten op)."""
    tolist, calls = torch.Tensor.tolist, []

    def counting_tolist(self, *args, **kwargs):
        calls.append(1)
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counting_tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    counts = {e.key: e.count for e in prof.key_averages()}
    return {**{name: counts.get(name, 0) for name in HOST_READS}, "tolist": len(calls)}


# The reference backend reproduces Open-Sora's packing of text tokens, which takes the lengths as
# Python ints (as xformers' BlockDiagonalMask does); the production backends never read them.
@pytest.mark.parametrize("backend, fused", [("sdpa", None), ("triton", "triton"), ("sdpa", "reference")])
def test_block_forward_backward_reads_nothing_on_the_host(backend, fused):
    if "triton" in (backend, fused) and (why := availability("triton", "cpu")) is not None:
        pytest.skip(f"triton on CPU: {why}")
    torch.manual_seed(0)
    model = from_preset("STDiT-mini", attention_backend=backend, fused_ops=fused)
    block = model.blocks[0]
    B, T, S, C, L = 2, 2, 4, model.hidden_size, 4
    x = torch.randn(B, T * S, C, requires_grad=True)
    y = torch.randn(B, L, C)
    t0 = torch.randn(B, 6 * C)
    y_lens = torch.tensor([4, 2])
    tpe = torch.randn(1, T, C)

    def step():
        out = block(x, y, t0, y_lens, T, tpe, backend, fused)
        out.square().sum().backward()

    step()  # first call: lazy imports and caches outside the measured call
    assert _host_reads(step) == {**{name: 0 for name in HOST_READS}, "tolist": 0}


def test_model_forward_checks_lengths_once():
    """The whole model reads the text mask on the host once per forward (its checks), not per block."""
    torch.manual_seed(0)
    model = from_preset("STDiT-mini", depth=3, attention_backend="sdpa").eval()
    x = torch.randn(2, 4, 2, 4, 4)
    y = torch.randn(2, 1, 4, 16)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        model(x, torch.tensor([1, 2]), y, mask)
        reads = _host_reads(lambda: model(x, torch.tensor([1, 2]), y, mask))
    assert 0 < reads["aten::item"] <= 2  # the 0/1 check and the at-least-one-token check
    assert reads["aten::nonzero"] == reads["tolist"] == 0

"""Regression: the correctness worker runs the quick blocks' checks in one process, in suite order;
the compiled STDiT block's backward then failed ("expected Tensor() for op:
torch.ops.stdit.triton_self_attention_backward") once the STDiT3 block (q/k norm + RoPE through the same
custom op) had run before it, because the plain call left the op's optional arguments to defaults."""

import pytest
import torch

from stdit.bench import correctness
from stdit.bench.suites import build_cases
from stdit.kernels import availability


@pytest.mark.skipif(availability("triton", "cpu") is not None, reason="needs triton (interpreter on CPU)")
def test_quick_block_checks_in_one_worker_all_pass():
    cases = [c for c in build_cases("blocks", "quick", torch.device("cpu"), only="8x128x128")
             if correctness.wants_check(c)]  # fmt: skip
    assert any("stdit3_block" in c.id for c in cases) and any("ours+compile" in c.id for c in cases)
    records = correctness.check_cases(cases)
    assert {cid: r["result"] for cid, r in records.items()} == {cid: "pass" for cid in records}

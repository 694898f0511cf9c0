"""Fast sampling on the model (stdit.models.accel): attention broadcast and step caching.

Exactness: every skip disabled gives bitwise the plain sampler's output (STDiT with IDDPM, STDiT3 with
rectified flow). Broadcast: which steps run each module follows the rule (an independent count from
the sampler's timesteps), and a reused output is the module's last computed one. Step caching: the
decisions follow the accumulated relative L1 change, checked against a hand computation.
"""

from __future__ import annotations

import pytest
import torch

from stdit.models.accel import (Broadcast, BroadcastModule, BroadcastRule, ChangeProbe, FastSampling, StepCache,
                                fit_broadcast_range)
from stdit.models import from_preset
from stdit.models.stdit import stdit_from_preset
from stdit.models.stdit3 import stdit3_from_preset
from stdit.train.diffusion import IDDPM
from stdit.train.rflow import RFlow


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (the default init zeroes the output layers, which hides differences)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _captions(model, batch: int = 1):
    g = torch.Generator().manual_seed(2)
    L, Ct = model.y_embedder.y_embedding.shape[0], model.y_embedder.y_proj.fc1.in_features
    return torch.randn(batch, 1, L, Ct, generator=g), torch.ones(batch, L, dtype=torch.long)


@pytest.fixture(scope="module")
def stdit():
    return _perturbed(stdit_from_preset("STDiT-mini", input_size=(4, 8, 8), depth=2, attention_backend="sdpa"))


@pytest.fixture(scope="module")
def stdit3():
    return _perturbed(stdit3_from_preset("STDiT3-mini", depth=2, attention_backend="sdpa"))


def _iddpm(model, steps=20, fs=None):
    y, mask = _captions(model)
    g = torch.Generator().manual_seed(0)
    return IDDPM(timestep_respacing=str(steps)).sample(
        model, (1, 4, 4, 8, 8), {"y": y, "mask": mask}, progress=False, generator=g,
        on_step=None if fs is None else fs.on_step,
    )  # fmt: skip


RF_KWARGS = {"height": torch.tensor([64.0]), "width": torch.tensor([64.0]), "num_frames": torch.tensor([4.0]),
             "fps": torch.tensor([24.0]), "ar": torch.tensor([1.0])}  # fmt: skip


def _rflow(model, steps=12, fs=None):
    y, mask = _captions(model)
    z = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return RFlow(num_sampling_steps=steps, cfg_scale=7.0).sample(
        model, z, y=y, mask=mask, model_kwargs=RF_KWARGS, on_step=None if fs is None else fs.on_step
    )


DISABLED = [
    (Broadcast(), 0.0),
    (Broadcast(spatial=BroadcastRule(1), temporal=BroadcastRule(1), cross=BroadcastRule(1), mlp=BroadcastRule(1)), None),
    (Broadcast.paper(mlp=True), None),  # enabled, but its range [450, 930] holds none of these timesteps
]


@pytest.mark.parametrize("family", ["stdit", "stdit3"])
@pytest.mark.parametrize("case", range(len(DISABLED)))
def test_disabled_is_bitwise_plain(family, case, stdit, stdit3, request):
    model = stdit if family == "stdit" else stdit3
    broadcast, threshold = DISABLED[case]
    run = _iddpm if family == "stdit" else _rflow
    plain = run(model, steps=3 if case == 2 else 8)
    if case == 2:  # 3 IDDPM steps: t = 999, 500-ish, 0 -> the middle is in range; move the range off it
        broadcast = Broadcast(**{k: BroadcastRule(r.interval, (1001.0, 2000.0), r.blocks) if r else None
                                 for k, r in broadcast.rules().items()})  # fmt: skip
    with FastSampling(model, broadcast, threshold) as fs:
        fast = run(model, steps=3 if case == 2 else 8, fs=fs)
    assert torch.equal(plain, fast)
    assert all(v["reused"] == 0 for v in fs.stats.values())


def _expected_runs(times: list[float], rule: BroadcastRule) -> list[bool]:
    """Whether the module runs at each step: always outside the range, every interval-th step inside."""
    runs, inside = [], 0
    for t in times:
        if rule.t_range[0] <= t <= rule.t_range[1]:
            runs.append(inside % rule.interval == 0)
            inside += 1
        else:
            runs.append(True)
    return runs


def test_broadcast_schedule_and_reused_outputs(stdit):
    """Each wrapped module runs exactly at the steps the rule gives; in between it returns its last output."""
    steps = 20
    diffusion = IDDPM(timestep_respacing=str(steps))
    times = [float(diffusion.timestep_map[i]) for i in reversed(range(steps))]
    broadcast = Broadcast.paper(mlp=True)
    calls: dict[tuple[str, int], list[int]] = {}
    outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
    step = {"i": -1}

    def on_step(i, t, n, fs):
        step["i"] = i
        fs.on_step(i, t, n)

    with FastSampling(stdit, broadcast) as fs:
        wrapped = [m for m in stdit.modules() if isinstance(m, BroadcastModule)]
        assert {(m.kind, m.block) for m in wrapped} == {(k, b) for k in ("spatial", "temporal", "cross") for b in (0, 1)} | {("mlp", 0), ("mlp", 1)}
        for m in wrapped:
            key = (m.kind, m.block)
            m.inner.register_forward_hook(lambda mod, a, out, key=key: calls.setdefault(key, []).append(step["i"]))
            m.register_forward_hook(lambda mod, a, out, key=key: outputs.setdefault(key, []).append(out))
        y, mask = _captions(stdit)
        diffusion.sample(stdit, (1, 4, 4, 8, 8), {"y": y, "mask": mask}, progress=False,
                         generator=torch.Generator().manual_seed(0), on_step=lambda i, t, n: on_step(i, t, n, fs))  # fmt: skip
    assert not any(isinstance(m, BroadcastModule) for m in stdit.modules())  # restored on exit
    for (kind, block), ran in calls.items():
        expected = _expected_runs(times, broadcast.rules()[kind])
        assert ran == [i for i, r in enumerate(expected) if r], (kind, block)
        outs = outputs[(kind, block)]
        for i, r in enumerate(expected):
            if not r:  # a broadcast step returns the very tensor of the last computed step
                last = max(j for j in range(i) if expected[j])
                assert outs[i] is outs[last]
    reused = {k: v["reused"] for k, v in fs.stats.items() if k != "steps"}
    assert reused == {k: 2 * _expected_runs(times, broadcast.rules()[k]).count(False) for k in reused}
    assert reused["spatial"] > 0 and reused["cross"] > reused["spatial"]


@pytest.mark.parametrize("family", ["stdit", "stdit3"])
def test_broadcast_changes_little(family, stdit, stdit3):
    """Broadcast is an approximation: the output moves, and stays close to the plain one."""
    model = stdit if family == "stdit" else stdit3
    run = _iddpm if family == "stdit" else _rflow
    plain = run(model)
    with FastSampling(model, Broadcast.paper()) as fs:
        fast = run(model, fs=fs)
    rel = ((fast - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.2, rel
    assert fs.stats["spatial"]["reused"] > 0


def test_step_cache_decisions_follow_accumulated_change():
    """run_blocks on a scripted sequence of probes: reuse while the accumulated relative L1 change stays
    under the threshold, always run the first and last step, and reuse means x + the last residual."""
    model = stdit_from_preset("STDiT-mini", depth=1)
    probes = [torch.full((1, 2, 3), v) for v in (1.0, 1.05, 1.10, 1.40, 1.42, 1.43)]
    # relative changes from step 1: 0.05, 0.0476, 0.2727, 0.0143, 0.0070
    threshold = 0.1
    rel = [abs(probes[i] - probes[i - 1]).sum().item() / abs(probes[i - 1]).sum().item() for i in range(1, 6)]
    acc, expected_run = 0.0, [True]
    for i, r in enumerate(rel, start=1):
        acc += r
        skip = acc < threshold and i != 5
        expected_run.append(not skip)
        if not skip:
            acc = 0.0
    assert expected_run == [True, False, False, True, False, True]  # the hand computation itself
    ran = []
    with FastSampling(model, step_cache=threshold) as fs:
        for i, p in enumerate(probes):
            fs.on_step(i, 999.0 - i, len(probes))
            x = torch.full((1, 2, 3), float(i))
            out = fs.run_blocks(x, lambda p=p: p, lambda x, i=i: (ran.append(i), x * 2 + i)[1])
            last = max(ran)  # a run step j leaves the residual 3j - j; a reused step adds it to its own x
            assert torch.equal(out, x + 2 * last), i
    assert [i in ran for i in range(6)] == expected_run
    assert fs.stats["steps"] == {"ran": 3, "reused": 3}


def test_step_cache_reduce_sees_the_sums_and_decides():
    """reduce gets [sum |p - p_prev|, sum |p_prev|] in float64; what it leaves there decides."""
    model = stdit_from_preset("STDiT-mini", depth=1)
    seen = []

    def reduce(t):  # as if another rank held a copy of the same tokens, plus a big change
        seen.append(t.clone())
        t.add_(torch.tensor([100.0, 0.0], dtype=t.dtype))

    with FastSampling(model, step_cache=0.5, reduce=reduce) as fs:
        for i in range(3):
            fs.on_step(i, 999.0 - i, 4)
            fs.run_blocks(torch.zeros(1, 1, 2), lambda: torch.ones(1, 1, 2), lambda x: x + 1)
    assert seen and seen[0].dtype == torch.float64 and seen[0].tolist() == [0.0, 2.0]
    assert fs.stats["steps"] == {"ran": 3, "reused": 0}  # without reduce's addition both would be skipped


@pytest.mark.parametrize("family, threshold", [("stdit", 0.05), ("stdit3", 0.5)])  # 12 RF steps change more
def test_step_cache_skips_and_stays_close(family, threshold, stdit, stdit3):
    model = stdit if family == "stdit" else stdit3
    run = _iddpm if family == "stdit" else _rflow
    plain = run(model)
    with FastSampling(model, step_cache=1e9) as fs:  # never runs the blocks but at the first and last step
        run(model, fs=fs)
    assert fs.stats["steps"]["ran"] == 2
    with FastSampling(model, step_cache=threshold) as fs:
        fast = run(model, fs=fs)
    assert 0 < fs.stats["steps"]["reused"] < fs.stats["steps"]["ran"] + fs.stats["steps"]["reused"]
    assert ((fast - plain).norm() / plain.norm()).item() < 0.2


def test_context_restores_the_model(stdit):
    keys = list(stdit.state_dict())
    modules = dict(stdit.named_modules())
    with FastSampling(stdit, Broadcast.paper(mlp=True), 0.1):
        with pytest.raises(RuntimeError, match="already open"):
            FastSampling(stdit, Broadcast.paper()).__enter__()
        assert stdit.fast_sampling is not None
    assert list(stdit.state_dict()) == keys
    assert all(modules[name] is m for name, m in stdit.named_modules())
    assert stdit.fast_sampling is None


def test_parse_and_bad_input():
    assert Broadcast.parse("paper") == Broadcast.paper()
    assert Broadcast.parse("paper+mlp").mlp.blocks == (0, 1, 2, 3, 4)
    assert not Broadcast.parse("off").enabled
    b = Broadcast.parse("spatial=3, cross=5, range=100:800")
    assert b.spatial == BroadcastRule(3, (100.0, 800.0)) and b.temporal is None and b.cross.interval == 5
    assert Broadcast.from_dict({"temporal": {"interval": 2, "range": [0, 500], "blocks": [1]}}).temporal.blocks == (1,)
    assert "spatial 2 in [450, 930]" in Broadcast.paper().label()
    for spec, match in [("spacial=2", "unknown kind"), ("spatial=two", "cannot read"), ("range=1:2:3", "low:high"),
                        ("", "expected"), ("spatial=0", "interval")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Broadcast.parse(spec)
    with pytest.raises(ValueError, match="t_range"):
        BroadcastRule(2, (900, 100))
    with pytest.raises(ValueError, match="threshold"):
        StepCache(-0.1)
    with pytest.raises(ValueError, match="unknown keys"):
        Broadcast.from_dict({"spatial": 2, "speed": 3})
    with pytest.raises(TypeError, match="broadcast"):
        FastSampling(stdit_from_preset("STDiT-mini"), broadcast="paper")
    with pytest.raises(TypeError, match="STDiT and STDiT3"):
        FastSampling(from_preset("DiT-mini"))


# -- where to broadcast: ChangeProbe and fit_broadcast_range ----------------------------------------


@pytest.mark.parametrize("family", ["stdit", "stdit3"])
def test_change_probe_reads_without_changing(family, stdit, stdit3):
    """The probe leaves the sample bitwise as it is, and its curves are the relative L1 change of each
    kind's outputs from one step to the next, summed over the kind's modules (an independent count from
    forward hooks on the plain model)."""
    model = stdit if family == "stdit" else stdit3
    run = _iddpm if family == "stdit" else _rflow
    outputs: dict[str, list[list[torch.Tensor]]] = {}
    step = {"i": -1}
    kinds = {"attn": "spatial", "attn_temp": "temporal", "cross_attn": "cross"}
    hooks = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in kinds and name.count(".") == 2:  # blocks.i.attn / spatial_blocks.i.attn ...
            kind = "temporal" if name.startswith("temporal_blocks") and leaf == "attn" else kinds[leaf]
            hooks.append(module.register_forward_hook(
                lambda m, a, out, kind=kind, key=name: outputs.setdefault(key, []).append((step["i"], kind, out))))
    plain = run(model, steps=6)
    outputs.clear()
    probe = ChangeProbe(model)

    class Both:  # the probe's on_step, and the step index for the hooks
        def on_step(self, i, t, n):
            step["i"] = i
            probe.on_step(i, t, n)

    with probe:
        probed = run(model, steps=6, fs=Both())
    for h in hooks:
        h.remove()
    assert torch.equal(plain, probed)
    curves = probe.curves()
    assert curves["step"] == list(range(6)) and all(a > b for a, b in zip(curves["t"], curves["t"][1:]))
    for kind in ("spatial", "temporal", "cross"):
        assert curves[kind][0] is None
        for i in range(1, 6):
            num = den = 0.0
            for calls in outputs.values():
                now = [o for s, k, o in calls if s == i and k == kind]
                before = [o for s, k, o in calls if s == i - 1 and k == kind]
                for a, b in zip(now, before):
                    num += (a - b).abs().sum().item()
                    den += b.abs().sum().item()
            assert curves[kind][i] == pytest.approx(num / den, rel=1e-9), (kind, i)
    assert not any(type(m).__name__ == "_ProbeModule" for m in model.modules())  # restored on exit


def test_fit_picks_the_quietest_window_and_its_range_holds_exactly_it():
    times = [999.0 - 99.9 * i for i in range(10)]
    quiet = [None, 5, 5, 5, 1, 1, 1, 1, 1, 5]  # steps 4-8 change least: the window starts one before them
    curves = {"t": times, "spatial": quiet, "temporal": [None if v is None else 10 * v for v in quiet],
              "cross": [None] + [0.1] * 9}  # fmt: skip
    fit = fit_broadcast_range(curves, fraction=0.5)
    assert (fit.first, fit.last, fit.steps) == (3, 7, 10)  # 5 steps; its first runs, steps 4-7 may reuse
    inside = [i for i, t in enumerate(times) if fit.t_range[0] <= t <= fit.t_range[1]]
    assert inside == list(range(3, 8))
    assert fit.label().startswith("range [") and "steps 3-7 of 10" in fit.label()
    b = Broadcast.paper(mlp=True, t_range=fit.t_range)
    assert b.spatial.t_range == b.mlp.t_range == fit.t_range and b.temporal.interval == 4
    assert Broadcast.paper(mlp=True).mlp.t_range == (650.0, 870.0)
    for bad, match in [({"t": times[:3], "spatial": quiet[:3], "temporal": quiet[:3], "cross": quiet[:3]}, "no window"),
                       ({**curves, "t": times[::-1]}, "decreasing"),
                       ({**curves, "cross": [None] * 10, "spatial": [None] * 10, "temporal": [None] * 10}, "no change"),
                       ({**curves, "cross": [0.1] * 3}, "expected 10 values")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            fit_broadcast_range(bad)
    with pytest.raises(ValueError, match="fraction"):
        fit_broadcast_range(curves, fraction=1.0)
    with pytest.raises(ValueError, match="kinds"):
        ChangeProbe(stdit_from_preset("STDiT-mini", depth=1), kinds=("attention",))

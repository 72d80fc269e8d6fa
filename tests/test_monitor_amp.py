"""The DeltaMonitor under mixed precision with a GradScaler.

``torch.autocast`` (bfloat16 and float16 on CPU; float16 and bfloat16 on CUDA) with
``torch.amp.GradScaler``: ``DeltaMonitor(model, scaler=scaler)`` reports the statistics of the unscaled
loss. Oracles: the torch.nn model in float32 without autocast (δ from tensor hooks), and the same
torchbp model without a scaler (a power-of-two scale is exact in floating point, so unscaling must give
the unscaled run's values); a step whose δ overflows is flagged, not logged as a huge number.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import DEVICES, STATS, DeltaOracle, bp_copy, mixed_mlp, read_events, scalar_series
from torch import nn

import torchbp

AMP_DTYPES = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]
# Half-precision δ against float32 δ: norms of sums of many rounded terms (8 or 11 bits of mantissa).
REL_TO_FLOAT32 = {torch.bfloat16: 4e-2, torch.float16: 5e-3}


def model_and_data(device):
    torch.manual_seed(0)
    torch_model, relu_after = mixed_mlp()
    torch_model = torch_model.to(device)
    x = torch.randn(32, 6, device=device)
    y = torch.randint(0, 4, (32,), device=device)
    return torch_model, relu_after, x, y


def amp_step(model, x, y, dtype, scaler=None):
    with torch.autocast(x.device.type, dtype=dtype):
        loss = torchbp.nn.CrossEntropyLoss()(model(x), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()


def close(a, b, rel):
    if a is None or b is None or isinstance(a, bool):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_scaled_mixed_precision_statistics_are_the_unscaled_float32_ones(dtype, device):
    torch_model, relu_after, x, y = model_and_data(device)
    oracle = DeltaOracle(torch_model)
    nn.functional.cross_entropy(torch_model(x), y).backward()  # float32, no autocast, no scale
    expected = oracle.stats(relu_after)

    scaled, plain = bp_copy(torch_model), bp_copy(torch_model)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    with torchbp.DeltaMonitor(scaled, scaler=scaler) as monitor, torchbp.DeltaMonitor(plain) as reference:
        amp_step(scaled, x, y, dtype, scaler)
        amp_step(plain, x, y, dtype)
        ours, unscaled = monitor.latest(), reference.latest()
    assert scaler.get_scale() == 2.0**12
    for name in expected:
        for stat in STATS:
            # Unscaling a power-of-two scale is exact: the same values as the unscaled run.
            assert close(ours[name][stat], unscaled[name][stat], 1e-6), (
                name,
                stat,
                ours[name][stat],
                unscaled[name][stat],
            )
            assert close(ours[name][stat], expected[name][stat], REL_TO_FLOAT32[dtype]), (
                name,
                stat,
                ours[name][stat],
                expected[name][stat],
            )
    # The norms are accumulated in float32, not in the half-precision dtype of δ.
    assert isinstance(ours["0"]["delta_sample_norm_max"], float) and ours["0"]["delta_nonfinite"] is False


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowing_step_is_flagged_skipped_and_not_logged_as_a_number(device, tmp_path):
    torch_model, _, x, y = model_and_data(device)
    model = bp_copy(torch_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # float16 overflows at 65504: a scale of 2^40 makes δ infinite; the scaler then skips the step and
    # backs off to 2^10, and the next step is finite.
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40, backoff_factor=2.0**-30)
    with torchbp.DeltaMonitor(model, log=tmp_path, every=1, scaler=scaler, histogram_every=1) as monitor:
        flags = []
        for _ in range(2):
            before = copy.deepcopy(model.state_dict())
            optimizer.zero_grad(set_to_none=True)
            amp_step(model, x, y, torch.float16, scaler)
            flags.append({name: s["delta_nonfinite"] for name, s in monitor.latest().items()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scaler.step(optimizer)
            scaler.update()
            changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert changed == (not any(flags[-1].values())), "the scaler skips exactly the flagged step"
    assert any(flags[0].values()) and not any(flags[1].values())
    ea = read_events(tmp_path)
    for name, nonfinite in flags[0].items():
        if nonfinite:
            assert scalar_series(ea, f"delta_nonfinite/{name}") == {0: 1.0, 1: 0.0}
            assert 0 not in scalar_series(ea, f"delta_norm/{name}"), "an overflowed step logged as a number"
        series = scalar_series(ea, f"delta_norm/{name}")
        assert 1 in series and math.isfinite(series[1]) and series[1] < 1e3

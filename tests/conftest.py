"""pytest configuration: a seeded RNG per test, the ``device`` fixture, and a small hypothesis profile."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES
from hypothesis import Phase, settings

# The tensors here are tiny: one intra-op thread is fastest, and it keeps OpenMP's thread hand-offs
# from dominating the run time on a busy machine (a (4, 5) log_softmax: ~3 µs on 1 thread, ~10 ms on 2
# threads with the cores taken). Results do not depend on it.
torch.set_num_threads(1)

# Modest and reproducible; no shrinking phase (the strategies draw small shapes already, and shrinking a
# failure can take longer than the rest of the suite).
settings.register_profile(
    "torchbp",
    max_examples=30,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile("torchbp")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """'cpu', and 'cuda' when a GPU is present (skipped with a reason otherwise).

    Modules can also ``@pytest.mark.parametrize("device", DEVICES)`` explicitly (``from helpers import DEVICES``).
    """
    return request.param

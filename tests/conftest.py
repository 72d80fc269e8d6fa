"""pytest configuration: a seeded RNG per test, the ``device`` fixture, a small hypothesis profile, and the
skip summary (the CUDA variants skipped on a machine without a GPU in one line, other skips with their reason)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch._dynamo
from helpers import CUDA_SKIP_REASON, DEVICES
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


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before the test, and its compile stance back at the default after
    (tests that count graphs and recompilations; tests that force a stance)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """'cpu', and 'cuda' when a GPU is present (skipped with a reason otherwise).

    Modules can also ``@pytest.mark.parametrize("device", DEVICES)`` explicitly (``from helpers import DEVICES``).
    """
    return request.param


def _skip_reason(report: pytest.TestReport) -> tuple[str, int | None, str]:
    path, lineno, reason = report.longrepr
    return os.path.relpath(path), lineno, reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line for the CUDA variants skipped on a machine without a GPU; every other skip with its reason.

    With ``-rs`` (or ``-ra``) on the command line pytest lists every skip itself, and this adds nothing.
    """
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped or "s" in terminalreporter.reportchars:
        return
    reasons = [_skip_reason(report) for report in skipped if isinstance(report.longrepr, tuple)]
    cuda = [path for path, _, reason in reasons if reason == CUDA_SKIP_REASON]
    others = Counter((path, lineno, reason) for path, lineno, reason in reasons if reason != CUDA_SKIP_REASON)
    terminalreporter.write_sep("=", "skipped", yellow=True)
    if cuda:
        files = len(set(cuda))
        terminalreporter.write_line(
            f"SKIPPED [{len(cuda)}] the cuda variants of the tests in {files} file{'s' if files != 1 else ''}: "
            f"{CUDA_SKIP_REASON} (torch.cuda.is_available() is False)"
        )
    for (path, lineno, reason), count in others.items():
        where = f"{path}:{lineno}" if lineno is not None else path
        terminalreporter.write_line(f"SKIPPED [{count}] {where}: {reason}")

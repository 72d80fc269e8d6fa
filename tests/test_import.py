"""``import torchbp`` stays light: what only logging needs loads when a monitor first logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_torchbp_loads_no_logging_package():
    code = (
        "import sys, torch, torchbp\n"
        "model = torch.nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2))\n"
        "model(torch.randn(2, 3)).sum().backward()\n"  # training without a monitor loads none of them either
        "print(sorted(m for m in ('google_crc32c', 'tensorboard', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"import torchbp loaded {proc.stdout.strip()}"


def test_a_monitor_that_logs_loads_them(tmp_path):
    code = (
        "import sys, torch, torchbp\n"
        "model = torch.nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2))\n"
        "with torchbp.DeltaMonitor(model, log=sys.argv[1], every=1):\n"
        "    model(torch.randn(2, 3)).sum().backward()\n"
        "print(sorted(m for m in ('google_crc32c', 'tensorboard') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['google_crc32c', 'tensorboard']", proc.stdout
    assert list(tmp_path.glob("events.out.tfevents.*")), "the monitor wrote no event file"

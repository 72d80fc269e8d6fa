"""Weights & Biases: ``wandb.init(sync_tensorboard=True)`` syncs what a DeltaMonitor logs, to a directory or to
a ``SummaryWriter`` (offline: the run's ``.wandb`` file, read back here, holds the monitor's keys and values)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb", reason="the W&B test needs wandb (pip install torchbp[integrations])")
pytest.importorskip("tensorboard", reason="the W&B test needs tensorboard")
from helpers import read_events, scalar_series  # noqa: E402

CHILD = Path(__file__).resolve().with_name("_wandb_child.py")
ROOT = CHILD.parent.parent  # the child imports this checkout's torchbp


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (``wandb.proto.wandb_internal_pb2.Record``).

    The file is a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then LevelDB's log format: 32 KiB
    blocks of chunks, each a 7-byte header (CRC-32C, little-endian length, type: 1 full, 2 first, 3 middle,
    4 last) and its bytes; a block's tail shorter than a header is padding.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log: it starts with {data[:7]!r}"
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield Record.FromString(b"".join(parts))
            parts = []


def history(path: Path) -> list[dict[str, str]]:
    """The run's history rows: {key: JSON value} per ``wandb.log`` (here: per synced TensorBoard step)."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_sync_tensorboard_holds_the_monitors_keys_from_a_directory_and_a_summary_writer(tmp_path):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    for source in ("dir", "writer"):
        synced = {}
        for row in rows:
            if f"{source}/delta_norm/0" in row:
                synced[int(row["global_step"])] = {k: v for k, v in row.items() if k.startswith(f"{source}/")}
        assert sorted(synced) == [0, 1, 2], f"{source}: steps synced {sorted(synced)} of the monitor's 0, 1, 2"
        ea = read_events(tmp_path / "tb" / source)
        for tag in ("delta_norm/0", "delta_norm/2", "delta_gain/0", "dead_fraction/0", "weight_grad_norm/2"):
            for step, value in scalar_series(ea, tag).items():
                assert float(synced[step][f"{source}/{tag}"]) == pytest.approx(value, rel=1e-6), (source, tag, step)

"""Child process for tests/test_events.py (run with sys.executable; not a test module).

python tests/_events_child.py kill LOGDIR
    Busy with torch matmuls, logs one scalar per step through torchbp.monitor.events.summary_writer and prints
    {"step": i, "t": time.monotonic()} (flushed) right after each add_scalar returns, until the parent
    SIGKILLs it; it exits by itself after 60 s.
python tests/_events_child.py atexit LOGDIR N
    Queues a slow closure, then N scalars, and exits normally without close(): the atexit hook must
    write them all.
"""

import json
import sys
import time

import torch

from torchbp.monitor.events import summary_writer

MAX_SECONDS = 60.0


def kill(logdir: str) -> None:
    writer = summary_writer(logdir)
    x = torch.randn(128, 128)
    end = time.monotonic() + MAX_SECONDS
    step = 0
    while time.monotonic() < end:
        y = x @ x
        x = y / y.norm() * 128
        writer.add_scalar("step", float(step), step)
        print(json.dumps({"step": step, "t": time.monotonic()}), flush=True)
        step += 1


def at_exit(logdir: str, n: int) -> None:
    writer = summary_writer(logdir)
    event_writer = writer._get_file_writer().event_writer._writer
    real = event_writer._write

    def slow_write(data):  # the thread is in its first write at exit, the events queued behind it
        event_writer._write = real
        time.sleep(0.3)
        real(data)

    event_writer._write = slow_write
    for step in range(n):
        writer.add_scalar("step", float(step), step)
    print("queued", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill(sys.argv[2])
    else:
        at_exit(sys.argv[2], int(sys.argv[3]))

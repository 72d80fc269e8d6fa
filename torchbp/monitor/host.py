"""The host side: the copy of a logged step's records to the host, the statistics table, the bounded history
and the events.

Threads, each with its reason (no others; no lock is held while the training thread waits on the device):

- the training thread builds the events of the logged steps in batches (numpy over the stacked records, then
  one Event per step) when the oldest is ``BATCH_S`` old: cheaper than per step, and cheaper than a thread
  contending for the GIL on every step;
- ``torchbp-monitor`` (one per logging monitor, a daemon, started at the first logged step) writes the steps
  logged before training pauses, so that each is handed to the operating system within about 0.25 s
  without waiting for the next backward pass;
- ``torchbp-delta-map`` (at most one at a time, not a daemon: at exit the picture finishes before the
  writer closes) draws the δ map with matplotlib, which takes far longer than a step;
- the event file's own writer thread (:mod:`torchbp.monitor.events`) does the file writes.
"""

from __future__ import annotations

import atexit
import collections
import json
import math
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..names import LINKS_TAG
from . import dataflow, ranks
from . import events as _events
from .records import (
    COUNT,
    DEAD,
    DEAD_GEN,
    DELTA_NORM,
    FRO,
    GEN,
    HISTOGRAM_BINS,
    SAMPLE_MAX,
    SAMPLE_MEAN,
    STATS,
    WEIGHT_NORM,
)
from .writer import png_size

#: The training thread builds the events of the logged steps in batches, when the oldest is this old (seconds);
#: a background thread writes those left when training pauses. With the writer's own 0.05 s, every logged step
#: is handed to the operating system within about 0.25 s.
BATCH_S = 0.1
#: The largest share of the run's time that drawing the δ map in the background may take (see HostSide.write_image).
IMAGE_SHARE = 0.01
#: The most steps :meth:`History.read` holds (see :class:`History`).
MAX_HISTORY = 2048
#: The tag of the text summary that holds the data flow's links (see :func:`links_event`).


def links(names: list[str], consumes: np.ndarray) -> list[tuple[str, str]]:
    """The data flow's links as ``(producer, consumer)`` names, network order (the input side's producer first):
    ``consumes[l, c]`` (:meth:`DataFlow.matrix`) says layer ``c`` reads layer ``l``'s output through
    element-wise operations; ``names`` in the monitor's order (the output side first)."""
    last = len(names) - 1
    pairs = sorted((last - int(p), last - int(c)) for p, c in np.argwhere(consumes))
    return [(names[last - p], names[last - c]) for p, c in pairs]


def links_event(step: int, pairs: list[tuple[str, str]]) -> bytes:
    """The serialized Event of ``step`` holding the data flow's links: a TensorBoard text summary (tag
    :data:`LINKS_TAG`, shown on TensorBoard's Text page) whose text is the JSON list of ``[producer, consumer]``
    pairs. Written once per event file, at the first logged step (the data flow is read by then);
    :func:`torchbp.report.read_logdir` reads it back as ``history["links"]``."""
    from tensorboard.plugins.text.summary_v2 import text_pb

    text = json.dumps([list(pair) for pair in pairs], ensure_ascii=False)
    return _events.ScalarEvents([]).event(step, time.time(), [], text_pb(LINKS_TAG, text).SerializeToString())


class HostCopy:
    """Tensors on their way to the host: on CUDA, non-blocking copies into pinned memory and an event."""

    def __init__(self, tensors: list[Tensor | None]) -> None:
        self.event = None
        self.copies: list[Tensor | None] = []
        for t in tensors:
            if t is not None and t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.copies.append(host.copy_(t, non_blocking=True))
                self.event = self.event or torch.cuda.Event()
            else:
                self.copies.append(t)
        if self.event is not None:
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> list[np.ndarray | None]:
        if self.event is not None:
            self.event.synchronize()
        return [None if t is None else t.detach().numpy() for t in self.copies]


@dataclass
class PendingStep:
    """A logged step (or a step with histograms only) on its way to the event file.

    ``copy`` holds, in order: the records (this rank's buffer, or every rank's with global statistics), the
    gathered vectors and the global weight-gradient norms (``None`` without global statistics), then one
    histogram per name of ``histograms``."""

    step: int
    gen: int
    scalars: bool
    histograms: list[str]
    copy: HostCopy
    queued_at: float


class Table:
    """Statistics for every layer: ``values[..., s, l]`` of STATS s and layer l (in the monitor's order),
    ``present[..., s, l]`` where that value applies, and per layer whether its backward ran and δ was finite."""

    def __init__(self, values: np.ndarray, present: np.ndarray, reached: np.ndarray, nonfinite: np.ndarray) -> None:
        self.values, self.present, self.reached, self.nonfinite = values, present, reached, nonfinite

    def __getitem__(self, k: int) -> Table:
        """Step ``k`` of a table of several steps."""
        return Table(self.values[k], self.present[k], self.reached[k], self.nonfinite[k])

    def as_dict(self, names: list[str]) -> dict[str, dict[str, Any]]:
        values, present = self.values.T.tolist(), self.present.T.tolist()
        out = {}
        for j, name in enumerate(names):
            if self.reached[j]:
                stats = {stat: (v if ok else None) for stat, v, ok in zip(STATS, values[j], present[j])}
                stats["delta_nonfinite"] = bool(self.nonfinite[j])
                out[name] = stats
        return out

    def shown(self) -> np.ndarray:
        """``values`` with NaN where a value does not apply, and where δ was not finite (but its flag)."""
        flag = (np.arange(len(STATS)) == len(STATS) - 1)[:, None]
        keep = self.present & (flag | ~self.nonfinite[..., None, :])
        return np.where(keep, self.values, np.nan)


class Layout:
    """What the table needs to know of the monitored layers: their widths and the data flow."""

    def __init__(self, widths: list[int], vector_at: list[int], flow: dataflow.DataFlow) -> None:
        self.widths, self.vector_at, self.flow = widths, vector_at, flow
        self.outs = np.array(widths, dtype=np.float64)

    def table(
        self,
        records: np.ndarray,
        gen: int | np.ndarray,
        vectors: np.ndarray | None = None,
        weight_norms: np.ndarray | None = None,
    ) -> Table:
        """The statistics of generation ``gen`` from a host copy of the records, for every layer at once (numpy).

        ``records`` is this rank's buffer, shape (layers + 1, COLUMNS), or several steps' buffers stacked,
        shape (steps, layers + 1, COLUMNS) with ``gen`` an array of their generations; with ``vectors`` it is
        every rank's buffer of one step, shape (ranks, layers + 1, COLUMNS), merged with their vectors and the
        norms of the all-reduced weight gradients."""
        if vectors is not None:  # (one step: records[0] holds every rank's)
            merged, reached = ranks.merge_ranks(records[0], vectors, int(gen[0]), self.vector_at, self.widths)
            merged, reached = merged[None], reached[None]
            merged[0, :, WEIGHT_NORM] = weight_norms
        else:
            gen = np.asarray(gen, dtype=np.float64)[..., None]
            merged, reached = records[..., :-1, :].astype(np.float64), records[..., :-1, GEN] == gen
        empty = merged[..., COUNT] == 0  # a batch of 0 rows: no statistics (not zeros: not a vanished δ)
        fro = np.where(empty, np.nan, merged[..., FRO])
        gain, has_gain = dataflow.gains(fro, reached, self.flow.matrix())
        with np.errstate(divide="ignore", invalid="ignore"):
            dead = np.where(self.outs > 0, 1 - merged[..., DEAD] / self.outs, 0.0)  # (the record: active units)
        has_dead = merged[..., DEAD_GEN] == gen
        has_weight = ~(merged[..., WEIGHT_NORM] < 0)  # (−1: not computed; NaN: computed, not finite)
        nonfinite = (
            ~np.isfinite(fro) & ~empty
        )  # a NaN or Inf anywhere in δ reaches its norm (as does |δ| > 1e19 in float32)
        norms = [merged[..., c] for c in (DELTA_NORM, FRO, SAMPLE_MEAN, SAMPLE_MAX, WEIGHT_NORM)]
        values = np.stack([*norms, gain, dead, nonfinite.astype(np.float64)], axis=-2)  # (the order of STATS)
        ones = np.ones_like(reached)
        some = ~empty
        present = np.stack([some, some, some, some, has_weight & some, has_gain & some, has_dead & some, ones], axis=-2)
        return Table(values, present & reached[..., None, :], reached, nonfinite)


class History:
    """The logged steps' statistics, at most ``columns`` of them: evenly spaced over the whole run, and the newest.

    ``columns - 1`` columns hold evenly spaced logged steps: every logged step is kept until they are full; then
    every second one is dropped and, from then on, only every second logged step is kept (every fourth after
    the next time, and so on). The last column holds the newest logged step when it is not one of those (it is
    replaced as new steps arrive), so the history always ends at the last logged step. The first logged step
    always stays (with ``columns=1``: only the newest). Memory is ``columns × len(STATS) × layers`` floats
    whatever the run's length.
    """

    def __init__(self, layers: int, columns: int = MAX_HISTORY) -> None:
        self.columns = columns
        self.values = np.full((columns, len(STATS), layers), np.nan)
        self.steps: list[int] = []  # the evenly spaced steps held, in values[: len(steps)]
        self.newest: int | None = None  # the newest logged step when it is not one of them, in values[-1]
        self.stride = 1  # keep every stride-th logged step
        self.seen = 0  # logged steps offered
        self.lock = threading.Lock()

    def add(self, steps: list[int], values: np.ndarray) -> None:
        """Logged ``steps`` and their values, shape (steps, STATS, layers)."""
        spaced = self.columns - 1  # (the last column is the newest step's)
        with self.lock:
            for step, v in zip(steps, values):
                k, self.seen = self.seen, self.seen + 1
                if spaced and k % self.stride == 0 and len(self.steps) == spaced:
                    # full: halve the resolution of what is held
                    kept = self.values[:spaced:2].copy()
                    self.values[:spaced] = np.nan
                    self.values[: len(kept)] = kept
                    self.steps = self.steps[::2]
                    self.stride *= 2
                if spaced and k % self.stride == 0:
                    self.values[len(self.steps)] = v
                    self.steps.append(step)
                    self.newest = None
                else:
                    self.values[-1] = v
                    self.newest = step

    def read(self) -> tuple[list[int], np.ndarray]:
        """(steps, values of shape (STATS, layers, steps)), the newest logged step last."""
        with self.lock:
            n = len(self.steps)
            if self.newest is None:
                return list(self.steps), self.values[:n].transpose(1, 2, 0).copy()
            values = np.concatenate([self.values[:n], self.values[-1:]])
            return [*self.steps, self.newest], values.transpose(1, 2, 0).copy()


_logging = weakref.WeakSet()


@atexit.register
def _write_all_at_exit() -> None:
    """At normal interpreter exit, stop every open monitor's background thread and write the logged steps it
    still holds (before the event files' own exit hook, registered earlier, closes them). A daemon thread still
    running when the interpreter finalizes is ended by ``pthread_exit`` as soon as it takes the GIL again; inside
    torch's C++ code (a CUDA event's wait) that aborts the process (``terminate called without an active
    exception``)."""
    for host in list(_logging):
        host.closing.set()
        if host.flusher is not None:
            host.flusher.join()
        if host.sink is not None:
            host.write_arrived(wait=True)


class HostSide:
    """The logged steps between the device and the event file: queued copies, batched events, the δ map.

    ``sink`` (:class:`torchbp.monitor.writer._Sink`) or ``None`` (nothing written, the history still kept),
    ``writer`` the SummaryWriter behind it, ``names`` the layers in the monitor's order."""

    def __init__(
        self, layout: Layout, names: list[str], sink, writer, image_every: int, warn_nonfinite: bool, on_error="warn"
    ):
        self.layout, self.names, self.sink, self.writer = layout, names, sink, writer
        self.on_error = on_error
        self.closed_sink = None  # (the sink after close: what it dropped stays readable)
        self.image_every = image_every
        self.warn_nonfinite = warn_nonfinite
        self.history = History(len(names))
        self.encoders: dict[bytes, _events.ScalarEvents] = {}
        self.pending: collections.deque[PendingStep] = collections.deque()
        self.lock = threading.RLock()
        self.closing = threading.Event()
        self.flusher: threading.Thread | None = None
        self.error: BaseException | None = None
        self.drawing: threading.Thread | None = None
        self.image_step: int | None = None
        self.next_image_at = 0.0  # (monotonic seconds) no δ map drawn in the background before then
        self.layout_written = False
        self.warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"DeltaMonitor: {message}", stacklevel=4)

    # -- queueing (training thread) ------------------------------------------------------------------

    def queue(self, step: int, gen: int, scalars: bool, records: list, hists: dict) -> None:
        names = [k for k, v in hists.items() if v is not None]
        copy = HostCopy(records + [hists[k] for k in names])
        with self.lock:
            self.pending.append(PendingStep(step, gen, scalars, names, copy, time.monotonic()))
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush_stragglers, name="torchbp-monitor", daemon=True)
            self.flusher.start()
            _logging.add(self)
        if self._oldest_age() >= BATCH_S:
            self.write_arrived()

    def _oldest_age(self) -> float:
        with self.lock:
            return time.monotonic() - self.pending[0].queued_at if self.pending else 0.0

    def write_arrived(self, wait: bool = False) -> None:
        """Build and queue the events of the logged steps whose records are on the host (on CPU: at once;
        on CUDA: when their copy has finished, checked without waiting, or waited for with ``wait``).

        All steps logged in the last ``BATCH_S`` seconds are built together (numpy over the stacked records,
        then one Event per step); the file writes happen in the writer's background thread."""
        with self.lock:
            batch: list[PendingStep] = []
            while self.pending and (wait or self.pending[0].copy.ready()):
                batch.append(self.pending.popleft())
            if not batch:
                return
            arrays = [entry.copy.wait() for entry in batch]
            data: list[bytes | None] = [None] * len(batch)
            plain = [k for k, (entry, a) in enumerate(zip(batch, arrays)) if entry.scalars and a[1] is None]
            if plain:  # this rank's records: every step of the batch at once
                steps = [batch[k].step for k in plain]
                block = self.layout.table(
                    np.stack([arrays[k][0] for k in plain]), np.array([batch[k].gen for k in plain])
                )
                self._scalars_written(steps, block)
                if self.sink is not None:
                    extras = [self._histograms(dict(zip(batch[k].histograms, arrays[k][3:]))) for k in plain]
                    for k, event in zip(plain, self._encode(steps, block, extras)):
                        data[k] = event
            for k, (entry, (records, vectors, weight_norms, *hists)) in enumerate(zip(batch, arrays)):
                if data[k] is None and (self.sink is not None or vectors is not None):
                    # histograms alone, or every rank's records (global statistics)
                    table = None
                    if entry.scalars:
                        table = self.layout.table(records[None], np.array([entry.gen]), vectors, weight_norms)
                        self._scalars_written([entry.step], table)
                    if self.sink is not None:
                        extra = self._histograms(dict(zip(entry.histograms, hists)))
                        data[k] = self._encode([entry.step], table, [extra])[0]
            if self.sink is None:
                return
            for event in data:
                if event is not None:
                    self.sink.write(event)
            if any(e.scalars and self.image_every and e.step % self.image_every == 0 and e.step > 0 for e in batch):
                self.write_image(background=True)

    def _scalars_written(self, steps: list[int], block: Table) -> None:
        """Keep the history of ``steps`` (whose statistics are ``block``), and warn of a non-finite δ."""
        self.history.add(steps, block.shown())
        bad = block.reached & block.nonfinite
        if bad.any() and self.warn_nonfinite:  # (with a GradScaler, an overflowing step is routine: it skips it)
            k, j = np.argwhere(bad)[0]
            warnings.warn(
                f"DeltaMonitor: δ is not finite at step {steps[k]}, first in layer {self.names[j]!r}", stacklevel=4
            )
        if self.sink is not None and not self.layout_written:  # TensorBoard's custom-scalars page
            self.layout_written = True
            layout = {"torchbp": {"delta_norm: ‖∂C/∂b‖ per layer": ["Multiline", [r"delta_norm/.*"]]}}
            self.sink.guarded(self.writer.add_custom_scalars, layout)
            self.sink.write(links_event(steps[0], links(self.names, self.layout.flow.matrix())))

    def _flush_stragglers(self) -> None:
        """Background thread: write the steps logged before training paused (within ~2 × BATCH_S)."""
        while not self.closing.wait(BATCH_S):
            if self._oldest_age() >= BATCH_S:
                try:
                    self.write_arrived()
                except Exception as e:  # kept for the training thread (flush/close), like the writer's errors
                    self.error = e
                    return

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            if self.on_error == "warn":
                self.warn_once("write", f"writing the logged steps failed: {type(error).__name__}: {error}")
                return
            raise RuntimeError(f"DeltaMonitor: writing the logged steps failed: {error}") from error

    def flush(self) -> None:
        self.write_arrived(wait=True)
        if self.sink is not None:
            self.sink.flush()
        self.raise_error()

    def close(self, owns_writer: bool) -> None:
        self.closing.set()
        if self.flusher is not None:
            self.flusher.join()
        self.write_arrived(wait=True)
        if self.sink is not None:
            self.write_image(background=False)
            self.sink.flush()
            if owns_writer:
                self.sink.guarded(self.writer.close)
            self.sink, self.closed_sink = None, self.sink
        self.raise_error()

    # -- events ------------------------------------------------------------------------------------

    def _histograms(self, hists: dict[str, np.ndarray]) -> bytes:
        """The serialized Summary values of δ's histograms (empty for none)."""
        if not hists:
            return b""
        summary = _events.scalar_summary([])
        for layer, h in hists.items():
            (mn, mx, total, squares, lo, hi), counts = h[:6].tolist(), h[6:]
            mn, mx = (mn if math.isfinite(mn) else lo), (mx if math.isfinite(mx) else hi)  # ±Inf: the bins' range
            width = (hi - lo) / HISTOGRAM_BINS
            limits = [lo + width * (i + 1) for i in range(HISTOGRAM_BINS)]
            summary.value.append(
                _events.histogram_value(f"delta/{layer}", mn, mx, float(counts.sum()), total, squares, limits, counts)
            )
        return summary.SerializeToString()

    def _encode(self, steps: list[int], block: Table | None, extras: list[bytes]) -> list[bytes]:
        """The serialized Events of ``steps``: the scalars of ``block`` (a layer whose δ is not finite: only its
        flag), and ``extras`` (serialized histograms). Steps logging the same tags are encoded together."""
        now = time.time()
        if block is None:
            return _events.ScalarEvents([]).events(steps, now, np.zeros((len(steps), 0)), extras)
        flag = (np.arange(len(STATS)) == len(STATS) - 1)[:, None]  # delta_nonfinite: always logged
        logged = block.present & (flag | ~block.nonfinite[:, None, :])  # (steps, STATS, layers)
        out: list[bytes] = []
        start = 0
        while start < len(steps):
            key = logged[start].tobytes()
            end = start + 1
            while end < len(steps) and logged[end].tobytes() == key:
                end += 1
            encoder = self.encoders.get(key)
            if encoder is None:  # a new set of tags (the first step, or a layer whose δ turned non-finite)
                mask = logged[start]
                tags = [f"{stat}/{n}" for j, n in enumerate(self.names) for i, stat in enumerate(STATS) if mask[i, j]]
                encoder = self.encoders[key] = _events.ScalarEvents(tags)
            picked = logged[start:end].transpose(0, 2, 1)
            values = block.values[start:end].transpose(0, 2, 1)[picked].reshape(end - start, -1)
            out += encoder.events(steps[start:end], now, values, extras[start:end])
            start = end
        return out

    def write_image(self, background: bool) -> None:
        """Draw the δ map of the logged steps so far (matplotlib, in a background thread during training)."""
        if self.sink is None or not self.history.seen:
            return
        if self.drawing is not None:
            if background and self.drawing.is_alive():
                return  # one drawing at a time
            self.drawing.join()
        if background and time.monotonic() < self.next_image_at:
            return  # (the δ map costs at most IMAGE_SHARE of the time: see next_image_at)
        history = self.read_history()
        step, sink = history["steps"][-1], self.sink
        if step == self.image_step:
            return  # nothing logged since the last image
        self.image_step = step
        from .. import picture

        def draw():
            started = time.monotonic()
            try:
                png = picture.render_png(picture.delta_map_figure({"": history}))
            except ImportError as e:
                self.warn_once("matplotlib", f"no δ map image in TensorBoard: {e}")
                return
            finally:
                # matplotlib takes ~0.2-0.6 s for one picture: the next one in the background waits long enough
                # for drawing to take at most IMAGE_SHARE of the run's time, whatever image_every says.
                now = time.monotonic()
                self.next_image_at = now + (now - started) * (1 / IMAGE_SHARE - 1)
            summary = _events.scalar_summary([])
            summary.value.append(_events.image_value("delta_map", png, *png_size(png)))
            sink.write(_events.ScalarEvents([]).event(step, time.time(), [], summary.SerializeToString()))

        if background:
            # Not a daemon: at interpreter exit the drawing finishes (and is written) before the writer closes.
            self.drawing = threading.Thread(target=draw, name="torchbp-delta-map")
            self.drawing.start()
        else:
            draw()

    def read_history(self) -> dict[str, Any]:
        """``{"steps", "layers" (network order, input side first), "links" (the data flow's (producer,
        consumer) pairs, see :func:`links`), <stat>: array (layers, steps)}``."""
        steps, values = self.history.read()
        out: dict[str, Any] = {
            "steps": steps,
            "layers": list(reversed(self.names)),
            "links": links(self.names, self.layout.flow.matrix()),
        }
        for i, stat in enumerate(STATS):
            out[stat] = np.ascontiguousarray(values[i][::-1])
        return out

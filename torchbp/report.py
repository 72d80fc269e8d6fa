r"""What the δ statistics say: findings, each with its evidence, from a :class:`torchbp.DeltaMonitor`'s logs.

:func:`read_logdir` reads a TensorBoard log directory with TensorBoard's own reader (one :data:`History` per
run); :func:`analyze` turns one history into a list of :class:`Finding`; :func:`format_report` writes them
as text, :func:`to_json` as a JSON-able dict. ``torchbp report LOGDIR`` (:mod:`torchbp.cli.report`) is these
four; a monitor can report on what it holds with ``format_report({"model": monitor.history()})``.

The history
-----------
A :data:`History` is the dict :meth:`torchbp.DeltaMonitor.history` returns and :func:`read_logdir` builds::

    {"steps":  list[int],            # the logged steps, increasing
     "layers": list[str],            # the monitored layers, network order (input side first)
     "links":  list[tuple[str, str]], # the data flow's (producer, consumer) pairs; absent in older logs
     <stat>:   np.ndarray (layers, steps), float64, NaN where the layer has no value at that step,
     "nonfinite": list of {"step", "layer", "tensor"}}  # only where a NaN or Inf was born (see below)

one array for each statistic of :data:`torchbp.monitor.STATS` the run holds (``delta_norm``,
``delta_sample_norm_mean``, ``delta_sample_norm_max``, ``weight_grad_norm``, ``delta_gain``,
``dead_fraction``, ``delta_nonfinite`` as 0/1), and ``delta_fro`` (‖δ‖ over the batch, Frobenius) where it
exists. The TensorBoard tags are ``<stat>/<layer>``. A statistic that is missing is left out; :func:`analyze`
uses what is there.

The findings and their thresholds
---------------------------------
Which norm: a layer's δ is judged on a norm over the batch of its per-sample errors δ_n: ``delta_fro``
(‖δ‖, Frobenius over the batch) when the run has it, else ``delta_sample_norm_mean`` (the mean over samples
of ‖δ_n‖); only a run with neither falls back on ``delta_norm`` and says so. Never on ``delta_norm`` =
‖Σ_n δ_n‖ = ‖∂C/∂b‖ when the others exist: a sum over the batch can cancel while every δ_n is ordinary (the
key projection of attention: softmax is unchanged by a shift shared by all keys, so the key bias's gradient
is exactly zero; ``delta_norm`` ≈ 1e-10 there says nothing about δ). Every finding names the norm it used.

Along the data flow: layer c *consumes* layer l when l's output reaches c's input through element-wise
operations only (``history["links"]``, which the monitor writes once per event file as the text summary
``torchbp/links``). A *chain* is a path along the links from a layer nothing monitored feeds to one that
feeds none, with :data:`MIN_GAINS` (2) links or more; its *gains* are ‖δ^l‖ / ‖δ^c‖ of each link. δ travels
back along the chains (BP2), so vanishing and exploding across layers are judged along them only. A log
without links falls back on the layers in network order with the rank-correlation test of :func:`_trend`
(:data:`TREND`), and its findings say so.

``vanishing``
    Along a chain, the first layer's norm below :data:`VANISHING_RATIO` (10%) of the last's (not exactly 0:
    a zero δ is ``stalled`` or ``dead_units``), with :data:`TREND` (80%) or more of the chain's gains below
    1, at :data:`PERSIST` (3) or more logged steps (all of them when the run has fewer). Nielsen, *Neural
    Networks and Deep Learning*, ch. 5, "Why are deep neural networks hard to train?": in a sigmoid net
    [784, 30, 30, 30, 30, 10] the first hidden layer learns about 100 times slower than the last, the
    *vanishing gradient problem*; with two hidden layers the gap is already 4-5 times. 10% (a layer
    learning ten times slower than the output side) is our line between the two. The evidence: the chain,
    its two ends' norms at the first such step, the ratio there and at its smallest, the steps, how many of
    the chain's gains were below 1, and Nielsen's speed of learning ‖∂C/∂b‖ of the two ends.
``exploding``
    Along a chain, the first layer's norm more than :data:`EXPLODING_RATIO` (100×) the last's, with 80% or
    more of its gains above 1, at :data:`PERSIST` or more steps; or a layer's norm growing more than
    :data:`GROWTH` (10^4×) from its first logged value. Our choice: Nielsen's ch. 5 100× in the other
    direction (the *exploding gradient problem*), far above the factor of a few that a healthy ReLU net
    shows (measured on ``torchbp demo``'s ReLU net: at most 8×).
``dead_units``
    A layer followed by ReLU with ``dead_fraction`` (units whose σ'(z) = 0 for every sample of the batch)
    of :data:`DEAD_FRACTION` (50%) or more at :data:`PERSIST` or more steps. Our choice: half the layer gives
    no gradient to its weights.
``nonfinite``
    Where the monitor saw a NaN or Inf born (tags ``nonfinite/<layer>``, checked on every step, logged or
    not: the history's ``"nonfinite"``, a list of ``{"step", "layer", "tensor"}``): the first step, the layer
    and the tensor (a layer's input, δ, ∂C/∂W or ∂C/∂b). A log without them (an older monitor's):
    ``delta_nonfinite`` at any step: the first step, and at that step the first layer backward reached
    (nearest the output side) whose δ held a NaN or an Inf, the layers with it, and how many steps had one.
``stalled``
    A layer whose norm moved less than :data:`STALL_RANGE` (0.1%: (max − min) / max, or δ exactly zero)
    over the last half of the logged steps (at least :data:`STALL_MIN_STEPS`, 4), and so did its ‖∂C/∂b‖
    (``delta_norm``) and ‖∂C/∂W‖ (``weight_grad_norm``) where the run has them, while the other layers'
    norms moved by :data:`MOVING_RANGE` (10%) or more (their median). Our choice: mini-batches make an
    ordinary δ move by far more than 0.1% from step to step. ‖δ‖ alone can be constant by the loss's
    construction (L1: the per-sample δ of the output is sign(ŷ − y)/N; Huber beyond its threshold, hinge, a
    linear critic) while the layer's gradients move with the batch: that layer learns.
``zero_bias_gradient`` (information, not a problem)
    ``delta_norm`` = ‖Σ_n δ_n‖ below :data:`CANCEL_RATIO` (10^-4) of the mean per-sample ‖δ_n‖ at the median
    step: the δ_n cancel over the batch, the bias gets (almost) no gradient while δ itself is ordinary.
    For uncorrelated δ_n the ratio is about √N; 10^-4 is our choice, far below any batch size's.
``ok``
    No problem found, with the key numbers: along the longest chain, the first / last layer's ratio at the
    first and last step (or that the data flow has no chain), the median gain and how many layers have one,
    the largest dead fraction, that every δ was finite.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from torchbp.names import LINKS_TAG, NONFINITE_TENSORS, NONFINITE_WORDS, ROOT_NAME, STATS, Nonfinite

__all__ = [
    "History",
    "Finding",
    "ReportError",
    "read_logdir",
    "analyze",
    "format_report",
    "to_json",
    "PROBLEMS",
]

#: The dict of :meth:`torchbp.DeltaMonitor.history` (see the module docstring).
History = dict[str, Any]

VANISHING_RATIO = 0.1
EXPLODING_RATIO = 100.0
GROWTH = 1e4
DEAD_FRACTION = 0.5
PERSIST = 3
TREND = 0.8
STALL_RANGE = 1e-3
MOVING_RANGE = 0.1
STALL_MIN_STEPS = 4
CANCEL_RATIO = 1e-4
MIN_GAINS = 2
MAX_CHAINS = 1000

#: The kinds of finding that are a problem (the others, ``zero_bias_gradient`` and ``ok``, are information).
PROBLEMS = ("nonfinite", "exploding", "vanishing", "dead_units", "stalled")

#: The statistics read besides :data:`torchbp.monitor.STATS` when a run has them.
EXTRA_STATS = ("delta_fro",)

_NORM_WORDS = {
    "delta_fro": "‖δ‖ over the batch (Frobenius)",
    "delta_sample_norm_mean": "the mean over samples of ‖δ_n‖",
    "delta_norm": "‖Σ_n δ_n‖ (the bias gradient; the run has no per-sample norm)",
}


class ReportError(Exception):
    """The log directory cannot be read (missing, not a directory, no event files, no δ statistics)."""


@dataclass
class Finding:
    """One thing the statistics say, with its evidence.

    Attributes:
        kind: one of :data:`PROBLEMS`, or ``"zero_bias_gradient"``, ``"ok"`` (information).
        layers: the layers concerned, network order.
        steps: the logged steps concerned.
        values: the evidence, one value per layer of ``layers``: ``vanishing`` and ``exploding`` (across the
            layers), each layer's norm ``stat`` at the first step flagged; ``exploding`` (during training), each
            layer's growth factor; ``dead_units``, the dead fraction at the last logged step; ``nonfinite``, the
            number of steps with a non-finite δ; ``stalled``, (max − min) / max of ``stat`` over the steps;
            ``zero_bias_gradient``, the median ‖Σ_n δ_n‖; ``ok``, each layer's norm at the last step.
        message: one paragraph in words, with the numbers.
        stat: the statistic ``values`` hold (e.g. ``"delta_sample_norm_mean"``).
    """

    kind: str
    layers: list[str]
    steps: list[int]
    values: list[float]
    message: str
    stat: str = ""

    @property
    def problem(self) -> bool:
        return self.kind in PROBLEMS


# --------------------------------------------------------------------------------------------------
# Reading event files
# --------------------------------------------------------------------------------------------------


def _stat_names() -> tuple[str, ...]:
    return (*STATS, *(stat for stat in EXTRA_STATS if stat not in STATS))


def _root_name() -> str:
    return ROOT_NAME


def _runs(path: str) -> list[str]:
    """The directories under ``path`` (itself included) that hold event files, sorted."""
    runs = []
    for directory, _, files in os.walk(path):
        if any("tfevents" in name for name in files):
            runs.append(directory)
    return sorted(runs)


def _network_order(seen: list[str], series: Mapping[tuple[str, str], Any]) -> list[str]:
    """The layers input side first, from the order the events first hold them (see :func:`read_logdir`).

    The monitor writes the output side first. Only where the gains say otherwise (the first layer seen has a
    gain, so a consumer, and the last one has none: the output layer) is the order seen kept."""
    gains = {layer for stat, layer in series if stat == "delta_gain"}
    if len(seen) >= 2 and seen[0] in gains and seen[-1] not in gains:
        return list(seen)
    return seen[::-1]


def _masked_crc32c():
    """The masked CRC-32C of TFRecord framing, as a function of the bytes: ``google-crc32c``'s CRC (hardware
    instructions where the CPU has them) where it is installed, else TensorBoard's own (pure Python).

    .. math:: \\text{masked} = (\\operatorname{rotr}_{15}(\\operatorname{crc32c}(data)) + \\text{0xa282ead8}) \\bmod 2^{32}
    """
    try:
        import google_crc32c
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        return masked_crc32c

    def masked(data: bytes) -> int:
        crc = google_crc32c.value(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked


def _damage(path: str, masked_crc32c) -> str | None:
    """What is lost of the event file ``path`` where a record's checksum does not match, or ``None`` if every
    record's does.

    An event file is a sequence of TFRecords: the payload's length (8 bytes, little-endian), the masked CRC-32C
    of those 8 bytes, the payload (a serialized ``Event``), its masked CRC-32C. TensorBoard's reader stops at the
    first record whose checksum fails, and reads nothing of the file after it: the events from there on are lost
    to TensorBoard and to this report. A record cut short at the end of the file is not damage: a writer may be
    writing it (TensorBoard waits for it too)."""
    size = os.path.getsize(path)
    offset, last = 0, None
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return None
            length = int.from_bytes(header[:8], "little")
            if masked_crc32c(header[:8]) != int.from_bytes(header[8:], "little"):
                break
            body = f.read(length + 4) if offset + 16 + length <= size else b""
            if len(body) < length + 4:
                return None
            if masked_crc32c(body[:length]) != int.from_bytes(body[length:], "little"):
                break
            last, offset = body[:length], offset + 16 + length
    from tensorboard.compat.proto.event_pb2 import Event

    event = Event.FromString(last) if last is not None else None
    read = (
        f"its events after step {event.step} are lost"
        if event is not None and event.HasField("summary")
        else "none of its events could be read"
    )
    return (
        f"{os.path.basename(path)} is damaged at byte {offset} of {size} (a checksum does not match): {read} "
        "(TensorBoard reads no further in this file)"
    )


def _links(acc, layers: list[str]) -> list[tuple[str, str]] | None:
    """The data flow's ``(producer, consumer)`` links the monitor wrote (its text summary, see
    :func:`torchbp.monitor.host.links_event`), between ``layers``, network order; ``None`` for a log without
    them (written before the monitor wrote its links)."""
    if LINKS_TAG not in acc.Tags().get("tensors", []):
        return None
    known, found = set(layers), set()
    for event in acc.Tensors(LINKS_TAG):
        try:
            pairs = json.loads(b"".join(event.tensor_proto.string_val).decode())
        except ValueError:
            continue
        for pair in pairs if isinstance(pairs, list) else []:
            if isinstance(pair, list) and len(pair) == 2 and set(pair) <= known:
                found.add((str(pair[0]), str(pair[1])))
    position = {layer: i for i, layer in enumerate(layers)}
    return sorted(found, key=lambda pair: (position[pair[0]], position[pair[1]]))


def read_logdir(path: str | os.PathLike) -> dict[str, History]:
    """Read every run under ``path`` with TensorBoard's ``EventAccumulator``: ``{run: History}``.

    A run is a directory holding event files (``events.out.tfevents.*``), named by its path relative to
    ``path`` (``"."`` for ``path`` itself). Runs without δ statistics (``<stat>/<layer>`` tags) are left out.
    Layers come in network order: the monitor writes each step's layers output side first (the order
    backward reaches them), so the reverse of the order in which the events first hold each layer, unless
    the gains show the order is already input side first (the output layer, which has no consumer, has no
    ``delta_gain``). A tag with an empty layer name (``delta_norm/``: the model itself is the layer) is read
    as the layer ``model``, the name a monitor gives it.

    Every record's checksum is checked: an event file with a damaged record (TensorBoard's reader stops
    there, and the rest of the file is lost) gives its run a ``"warnings"`` entry (a list of lines) that names
    the file and from which step on its events are lost; the run holds the steps that could be read (a run
    left with no δ statistics is kept, with its warning and no step).

    Raises:
        ReportError: ``path`` is missing or not a directory, holds no event files, or none with δ statistics.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ReportError(f"{path!r} does not exist; pass the log directory a DeltaMonitor wrote to (its log=)")
    if not os.path.isdir(path):
        raise ReportError(f"{path!r} is a file, not a directory; pass the log directory a DeltaMonitor wrote to")
    runs = _runs(path)
    if not runs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {path!r}")
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as e:
        raise ReportError("reading event files needs tensorboard: pip install tensorboard") from e
    stats, root, crc = _stat_names(), _root_name(), _masked_crc32c()
    out: dict[str, History] = {}
    for run in runs:
        files = sorted(name for name in os.listdir(run) if "tfevents" in name)
        damage = [_damage(os.path.join(run, name), crc) for name in files]
        warnings = [line for line in damage if line is not None]
        acc = event_accumulator.EventAccumulator(run, size_guidance={event_accumulator.SCALARS: 0})
        try:
            acc.Reload()
        except Exception as e:  # a file TensorBoard cannot parse
            raise ReportError(f"cannot read the event files in {run!r}: {type(e).__name__}: {e}") from None
        series: dict[tuple[str, str], dict[int, float]] = {}
        seen: list[str] = []
        births = []
        for tag in acc.Tags().get("scalars", []):
            stat, slash, layer = tag.partition("/")
            if stat == "nonfinite" and slash:  # where a NaN or Inf was born: the value is 1 + the tensor's index
                births += [_birth(event.step, layer or root, event.value) for event in acc.Scalars(tag)]
            if stat not in stats or not slash:
                continue
            layer = layer or root  # (the model itself)
            if layer not in seen:
                seen.append(layer)
            series[stat, layer] = {event.step: event.value for event in acc.Scalars(tag)}  # last value per step
        if not series:
            if warnings:
                out[os.path.relpath(run, path)] = {"steps": [], "layers": [], "warnings": warnings}
            continue
        layers = _network_order(seen, series)
        links = _links(acc, layers)
        steps = sorted({step for values in series.values() for step in values})
        column = {step: j for j, step in enumerate(steps)}
        history: History = {"steps": steps, "layers": layers}
        if links is not None:
            history["links"] = links
        for stat in stats:
            if not any(s == stat for s, _ in series):
                continue
            array = np.full((len(layers), len(steps)), np.nan)
            for i, layer in enumerate(layers):
                for step, value in series.get((stat, layer), {}).items():
                    array[i, column[step]] = value
            history[stat] = array
        if warnings:
            history["warnings"] = warnings
        if births:
            history["nonfinite"] = sorted(births, key=lambda b: b["step"])
        out[os.path.relpath(run, path)] = history
    if not out:
        raise ReportError(
            f"the event files under {path!r} hold no δ statistics (tags such as delta_norm/<layer>, written by "
            "a torchbp.DeltaMonitor)"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def _array(history: History, stat: str) -> np.ndarray | None:
    if stat not in history:
        return None
    array = np.asarray(history[stat], dtype=np.float64)
    if array.ndim != 2 or array.shape != (len(history["layers"]), len(history["steps"])):
        raise ValueError(
            f"history[{stat!r}]: expected an array of shape (layers, steps) = "
            f"({len(history['layers'])}, {len(history['steps'])}), got shape {array.shape}"
        )
    return array


def _norm_stat(history: History) -> str | None:
    for stat in ("delta_fro", "delta_sample_norm_mean", "delta_norm"):
        if stat in history:
            return stat
    return None


def _g(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


def _e(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.2e}"


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def _span(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _persistent(mask: np.ndarray) -> bool:
    return int(mask.sum()) >= min(PERSIST, mask.size) and mask.any()


def _trend(norm: np.ndarray) -> np.ndarray:
    """Per step, the rank correlation (Spearman's) of the layers' norms with their position, input side first:
    1 when the norm rises steadily from the input side to the output side, -1 when it falls."""
    out = np.full(norm.shape[1], np.nan)
    for j in range(norm.shape[1]):
        column = norm[:, j]
        keep = np.isfinite(column)
        if keep.sum() < 2:
            continue
        ranks = np.argsort(np.argsort(column[keep], kind="stable"), kind="stable").astype(np.float64)
        position = np.arange(keep.sum(), dtype=np.float64)
        if ranks.std() == 0:
            continue
        out[j] = float(np.corrcoef(ranks, position)[0, 1])
    return out


def _gains_below_one(history: History, columns: np.ndarray | None = None) -> tuple[int, float, list[int]]:
    """Steps (of ``columns``, default all) at which every gain the history holds was below 1, the median gain
    over them, and the layers that have a gain."""
    gain = _array(history, "delta_gain")
    if gain is not None and columns is not None:
        gain = gain[:, columns]
    if gain is None or not np.isfinite(gain).any():
        return 0, math.nan, []
    has = np.isfinite(gain).any(0)
    below = (np.where(np.isfinite(gain), gain < 1, True)).all(0) & has
    with_gain = [i for i in range(gain.shape[0]) if np.isfinite(gain[i]).any()]
    return int(below.sum()), float(np.nanmedian(gain)), with_gain


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(layers: list[str], rows: list[int]) -> str:
    names = [layers[i] for i in rows]
    return ", ".join(names if len(names) <= 6 else [*names[:3], "…", *names[-2:]])


#: What a finding across layers says of a log without the data flow's links.
_NO_LINKS = (
    " This log holds no data-flow links (written before the monitor recorded them): the {n} layers are compared "
    "in network order, which is the path δ takes only if each layer feeds the next."
)


def analyze(history: History) -> list[Finding]:
    """The findings of one run's history (see the module docstring for each kind and its threshold).

    Problems come first (non-finite, exploding, vanishing, dead units, stalled), then information; a run
    with no problem gets one ``"ok"`` finding with its key numbers.
    """
    layers, steps = list(history["layers"]), [int(s) for s in history["steps"]]
    findings: list[Finding] = []
    if not layers or not steps:
        return [Finding("ok", layers, steps, [], "no logged step: nothing to judge")]
    stat = _norm_stat(history)
    norm = _array(history, stat) if stat else None
    words = _NORM_WORDS.get(stat or "", "")
    findings += _nonfinite(history, layers, steps)
    chains = _chains(history, layers)
    ratio = trend = None
    if norm is not None and chains is not None:
        findings += _along_chains(history, norm, chains, layers, steps, stat, words, "exploding")
        findings += _growth(norm, layers, steps, stat, words)
        findings += _along_chains(history, norm, chains, layers, steps, stat, words, "vanishing")
    elif norm is not None and len(layers) >= 2:  # a log without links: the layers in network order
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = norm[0] / norm[-1]
        trend = _trend(norm)
        findings += _exploding(norm, ratio, trend, layers, steps, stat, words)
        findings += _growth(norm, layers, steps, stat, words)
        findings += _vanishing(history, norm, ratio, trend, layers, steps, stat, words)
    elif norm is not None:
        findings += _growth(norm, layers, steps, stat, words)
    findings += _dead(history, layers, steps)
    if norm is not None:
        findings += _stalled(history, norm, layers, steps, stat, words)
    info = _zero_bias_gradient(history, layers, steps)
    if not any(f.problem for f in findings):
        findings.append(_ok(history, norm, chains, ratio, trend, layers, steps, stat, words))
    return findings + info


def _birth(step: int, layer: str, value: float) -> dict[str, Any]:
    k = int(round(value)) - 1
    return {"step": int(step), "layer": layer, "tensor": NONFINITE_TENSORS[k] if 0 <= k < 4 else "delta"}


def _births_finding(history: History, layers: list[str], steps: list[int]) -> list[Finding]:
    """Where the monitor saw a NaN or Inf born (``history["nonfinite"]``: checked on every step, logged or not)."""
    births = [Nonfinite(int(b["step"]), str(b["layer"]), str(b["tensor"])) for b in history["nonfinite"]]
    if not births:
        return []
    first_step = min(b.step for b in births)
    at_first = [b for b in births if b.step == first_step]
    order = {"input": 0, "delta": 1, "bias_grad": 1, "weight_grad": 2}
    position = {name: i for i, name in enumerate(layers)}  # (network order, input side first)

    def rank(b: Nonfinite) -> tuple:
        i = position.get(b.layer, 0)
        return (order.get(b.tensor, 1), i if b.tensor == "input" else -i)

    origin = min(at_first, key=rank)
    names = [origin.layer] + sorted({b.layer for b in at_first} - {origin.layer}, key=lambda n: position.get(n, 0))
    also = sorted({f"{NONFINITE_WORDS.get(b.tensor, b.tensor)} of {b.layer}" for b in at_first if b != origin})
    logged = "" if first_step in steps else " (a step that was not logged)"
    message = (
        f"a NaN or Inf was born at step {first_step}{logged}, in {NONFINITE_WORDS.get(origin.tensor, origin.tensor)} "
        f"of layer {origin.layer}"
        + (f" (at that step also in {', '.join(also)})" if also else "")
        + ". "
        + _ORIGIN_HINT.get(origin.tensor, "")
    )
    return [Finding("nonfinite", names, [first_step], [float(len(at_first))], message, "nonfinite")]


_ORIGIN_HINT = {
    "input": "A non-finite input reaches every layer after it in forward: look at what entered the layer named "
    "(the data, e.g. a padded row a loss ignores, or the layer before it: its weights).",
    "delta": "A NaN or Inf in the loss or the output layer's δ reaches every layer below it (BP2): look at what "
    "entered the layer named first.",
    "bias_grad": "A NaN or Inf in the loss or the output layer's δ reaches every layer below it (BP2): look at what "
    "entered the layer named first.",
    "weight_grad": "δ and the layer's input were finite: the product overflowed.",
}


def _chains(history: History, layers: list[str]) -> list[list[int]] | None:
    """The paths of the data flow (``history["links"]``) from a layer no monitored layer feeds to one that
    feeds none, with :data:`MIN_GAINS` links or more, as lists of layer indices (input side first; at most
    :data:`MAX_CHAINS`); ``None`` for a history without links."""
    links = history.get("links")
    if links is None:
        return None
    index = {name: i for i, name in enumerate(layers)}
    after: dict[int, list[int]] = {}
    fed: set[int] = set()
    for producer, consumer in links:
        if producer in index and consumer in index and producer != consumer:
            after.setdefault(index[producer], []).append(index[consumer])
            fed.add(index[consumer])
    chains: list[list[int]] = []
    stack = [[i] for i in sorted(after, reverse=True) if i not in fed]
    while stack and len(chains) < MAX_CHAINS:
        path = stack.pop()
        onward = sorted((c for c in after.get(path[-1], []) if c not in path), reverse=True)
        if onward:
            stack.extend([*path, c] for c in onward)
        elif len(path) > MIN_GAINS:
            chains.append(path)
    return chains


def _chain_words(layers: list[str], chain: list[int]) -> str:
    names = [layers[i] for i in chain]
    shown = names if len(names) <= 8 else [*names[:3], "…", *names[-2:]]
    return " → ".join(shown)


def _link_gains(norm: np.ndarray, chain: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the ratio of the chain's first layer's norm to its last's, and the gain of each link,
    ‖δ^l‖ / ‖δ^c‖ of producer l and consumer c, shape (links, steps)."""
    sub = norm[chain]
    with np.errstate(divide="ignore", invalid="ignore"):
        return sub[0] / sub[-1], sub[:-1] / sub[1:]


def _along_chains(history, norm, chains, layers, steps, stat, words, kind) -> list[Finding]:
    """``vanishing`` or ``exploding`` along the chains of linked layers: the first layer's norm below
    :data:`VANISHING_RATIO` (above :data:`EXPLODING_RATIO`) of the last's, with :data:`TREND` of the chain's
    gains or more below 1 (above 1), at :data:`PERSIST` or more steps. The chain flagged at the most steps
    is the one reported."""
    flagged: list[tuple[tuple, list[int], np.ndarray, np.ndarray, np.ndarray]] = []
    for chain in chains:
        ratio, gains = _link_gains(norm, chain)
        links = len(chain) - 1
        measured = np.isfinite(ratio) & (ratio > 0)
        if kind == "vanishing":
            hit = measured & (ratio < VANISHING_RATIO) & ((gains < 1).sum(0) >= TREND * links)
        else:
            hit = measured & (ratio > EXPLODING_RATIO) & ((gains > 1).sum(0) >= TREND * links)
        if _persistent(hit):
            extreme = float(np.min(ratio[hit])) if kind == "vanishing" else -float(np.max(ratio[hit]))
            flagged.append(((-int(hit.sum()), -links, extreme), chain, hit, ratio, gains))
    if not flagged:
        return []
    _, chain, hit, ratio, gains = min(flagged, key=lambda entry: entry[0])
    idx = np.nonzero(hit)[0]
    j = int(idx[0])
    k = int(idx[np.argmin(ratio[idx])]) if kind == "vanishing" else int(idx[np.argmax(ratio[idx])])
    first, last, links = layers[chain[0]], layers[chain[-1]], len(chain) - 1
    steps_flagged = [steps[m] for m in idx]
    side = (gains[:, j] < 1) if kind == "vanishing" else (gains[:, j] > 1)
    others = (
        f" {len(flagged)} of the {len(chains)} chains of linked layers show it; this one at the most steps."
        if len(flagged) > 1
        else ""
    )
    evidence = (
        f"{words} of {first} is {_pct(ratio[j]) if kind == 'vanishing' else _g(ratio[j]) + '×'} "
        f"{'of ' if kind == 'vanishing' else ''}{last}'s ({_e(norm[chain[0], j])} vs {_e(norm[chain[-1], j])} at step "
        f"{steps[j]}), {'below ' + _pct(VANISHING_RATIO) if kind == 'vanishing' else f'above {EXPLODING_RATIO:g}×'} "
        f"at {len(steps_flagged)} of {len(steps)} logged steps ({_span(steps_flagged)}), "
        f"{'down to ' + _pct(ratio[k]) if kind == 'vanishing' else 'up to ' + _g(ratio[k]) + '×'} at step {steps[k]}; "
        f"along the {links} gains ‖δ^l‖ / ‖δ^c‖ of the linked layers {_chain_words(layers, chain)} (each one's "
        "output reaches the next through element-wise operations only: the data flow the monitor read), "
        f"{int(side.sum())} of the {links} gains were {'below' if kind == 'vanishing' else 'above'} 1 at step "
        f"{steps[j]} (median {_g(float(np.nanmedian(gains[:, j])))}).{others}"
    )
    if kind == "vanishing":
        speed = ""
        bias = _array(history, "delta_norm")
        b0, b1 = (bias[chain[0], j], bias[chain[-1], j]) if bias is not None else (math.nan, math.nan)
        if stat != "delta_norm" and b1 > 0 and math.isfinite(b0):
            speed = (
                f" Nielsen's speed of learning, ‖∂C/∂b‖ = ‖Σ_n δ_n‖ (BP3), of {first} is {_pct(b0 / b1)} of "
                f"{last}'s there."
            )
        message = (
            f"δ vanishes toward the input: {evidence} δ shrinks at each link on its way back.{speed} The input "
            "side learns far slower than the output side: the vanishing gradient (Nielsen ch. 5)."
        )
    else:
        message = (
            f"δ grows toward the input: {evidence} The exploding gradient (Nielsen ch. 5); the input side's "
            "updates are far larger than the output side's."
        )
    names = [layers[i] for i in chain]
    return [Finding(kind, names, steps_flagged, [float(v) for v in norm[chain, j]], message, stat)]


def _nonfinite(history: History, layers: list[str], steps: list[int]) -> list[Finding]:
    if history.get("nonfinite"):
        return _births_finding(history, layers, steps)
    flags = _array(history, "delta_nonfinite")
    if flags is None:
        return []
    bad = np.nan_to_num(flags, nan=0.0) > 0
    if not bad.any():
        return []
    first = int(np.nonzero(bad.any(0))[0][0])
    at_first = [i for i in range(len(layers)) if bad[i, first]]
    origin = layers[max(at_first)]  # backward runs from the output side
    bad_steps = [steps[j] for j in np.nonzero(bad.any(0))[0]]
    names = [layers[i] for i in at_first]
    others = [n for n in names[::-1] if n != origin]
    message = (
        f"δ was not finite (NaN or Inf) first at step {steps[first]}, in {origin}, the first layer backward reached "
        f"with it" + (f" (then {', '.join(others)})" if others else "") + f"; {len(bad_steps)} of {len(steps)} "
        f"logged steps had a non-finite δ (last at step {bad_steps[-1]}). A NaN or Inf in the loss or the output "
        "layer's δ reaches every layer below it (BP2): look at what entered the layer named first."
    )
    counts = [float(bad[i].sum()) for i in at_first]
    return [Finding("nonfinite", names, bad_steps, counts, message, "delta_nonfinite")]


def _exploding(norm, ratio, trend, layers, steps, stat, words) -> list[Finding]:
    out = []
    high = (np.nan_to_num(ratio, nan=0.0) > EXPLODING_RATIO) & (np.nan_to_num(trend, nan=0.0) <= -TREND)
    if _persistent(high):
        idx = np.nonzero(high)[0]
        j = int(idx[0])
        worst = float(np.nanmax(ratio[idx]))
        flagged = [steps[k] for k in idx]
        out.append(
            Finding(
                "exploding",
                layers,
                flagged,
                [float(v) for v in norm[:, j]],
                f"δ grows toward the input: {words} of {layers[0]} is {_g(ratio[j])}× {layers[-1]}'s "
                f"({_e(norm[0, j])} vs {_e(norm[-1, j])} at step {steps[j]}), above {EXPLODING_RATIO:g}× at "
                f"{len(flagged)} of {len(steps)} logged steps ({_span(flagged)}), at most {_g(worst)}×, the norm "
                f"falling steadily from the input side to the output side (rank correlation with depth "
                f"{_g(trend[j])}): "
                "the exploding gradient (Nielsen ch. 5); the input side's updates are far larger than the output "
                "side's." + _NO_LINKS.format(n=len(layers)),
                stat,
            )
        )
    return out


def _growth(norm, layers, steps, stat, words) -> list[Finding]:
    """``exploding`` during training: a layer's norm more than :data:`GROWTH` × its first logged value."""
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.array([row[np.isfinite(row)][0] if np.isfinite(row).any() else np.nan for row in norm])
        peak = np.array([row[np.isfinite(row)].max() if np.isfinite(row).any() else np.nan for row in norm])
        growth = peak / first
    grown = [i for i in range(len(layers)) if np.isfinite(growth[i]) and growth[i] > GROWTH]
    if grown:
        i = max(grown, key=lambda k: growth[k])
        j = int(np.nanargmax(norm[i]))
        out.append(
            Finding(
                "exploding",
                [layers[k] for k in grown],
                [steps[0], steps[j]],
                [float(growth[k]) for k in grown],
                f"δ grows during training: {words} of {layers[i]} rose {_g(growth[i])}× from its first logged "
                f"value to {_e(norm[i, j])} at step {steps[j]} (more than {GROWTH:g}×"
                + (f"; also {', '.join(layers[k] for k in grown if k != i)}" if len(grown) > 1 else "")
                + "); values: the growth of each layer.",
                stat,
            )
        )
    return out


def _vanishing(history, norm, ratio, trend, layers, steps, stat, words) -> list[Finding]:
    low = (np.nan_to_num(ratio, nan=np.inf) < VANISHING_RATIO) & (np.nan_to_num(trend, nan=0.0) >= TREND)
    if not _persistent(low):
        return []
    idx = np.nonzero(low)[0]
    j = int(idx[0])
    k = int(idx[np.nanargmin(ratio[idx])])
    flagged = [steps[m] for m in idx]
    below, median_gain, with_gain = _gains_below_one(history, idx)
    if not below:
        gains = ""
    elif len(with_gain) == 1:
        gains = (
            f" At {below} of these {len(flagged)} steps the one gain the log holds (‖δ^l‖ / ‖δ^c‖ of "
            f"{layers[with_gain[0]]}, c the layers it feeds) was below 1 ({_g(median_gain)} median)."
        )
    else:
        gains = (
            f" At {below} of these {len(flagged)} steps each of the {len(with_gain)} gains the log holds "
            f"(‖δ^l‖ / ‖δ^c‖ of {_names(layers, with_gain)}, c the layers each feeds) was below 1 (median gain "
            f"{_g(median_gain)})."
        )
    speed = ""
    bias = _array(history, "delta_norm")
    if stat != "delta_norm" and bias is not None and bias[-1, j] > 0 and np.isfinite(bias[[0, -1], j]).all():
        speed = (
            f" Nielsen's speed of learning, ‖∂C/∂b‖ = ‖Σ_n δ_n‖ (BP3), of {layers[0]} is "
            f"{_pct(bias[0, j] / bias[-1, j])} of {layers[-1]}'s there."
        )
    message = (
        f"δ vanishes toward the input: {words} of {layers[0]} is {_pct(ratio[j])} of {layers[-1]}'s "
        f"({_e(norm[0, j])} vs {_e(norm[-1, j])} at step {steps[j]}), below {_pct(VANISHING_RATIO)} at "
        f"{len(flagged)} of {len(steps)} logged steps ({_span(flagged)}), down to {_pct(ratio[k])} at step "
        f"{steps[k]}; the norm rises steadily from the input side to the output side (rank correlation with depth "
        f"{_g(trend[j])}).{gains}{speed} The input side learns far slower than the output side: the vanishing "
        "gradient (Nielsen ch. 5)." + _NO_LINKS.format(n=len(layers))
    )
    return [Finding("vanishing", layers, flagged, [float(v) for v in norm[:, j]], message, stat)]


def _dead(history, layers, steps) -> list[Finding]:
    dead = _array(history, "dead_fraction")
    if dead is None:
        return []
    out = []
    hits = [i for i in range(len(layers)) if _persistent(np.nan_to_num(dead[i], nan=0.0) >= DEAD_FRACTION)]
    if hits:
        mask = (np.nan_to_num(dead[hits], nan=0.0) >= DEAD_FRACTION).any(0)
        flagged = [steps[j] for j in np.nonzero(mask)[0]]
        last = [float(dead[i][np.isfinite(dead[i])][-1]) for i in hits]
        worst = [float(np.nanmax(dead[i])) for i in hits]
        parts = ", ".join(f"{layers[i]} {_pct(v)} (at most {_pct(w)})" for i, v, w in zip(hits, last, worst))
        out.append(
            Finding(
                "dead_units",
                [layers[i] for i in hits],
                flagged,
                last,
                f"dead ReLU units: {parts} of the units gave σ'(z) = 0 for every sample of the batch at the last "
                f"logged step; {_pct(DEAD_FRACTION)} or more at {len(flagged)} of {len(steps)} logged steps "
                f"({_span(flagged)}). A dead unit passes no δ back and its weights get no gradient (BP4); "
                "a smaller learning rate, another initialisation or a leaky activation can revive them.",
                "dead_fraction",
            )
        )
    return out


def _spread(window: np.ndarray) -> np.ndarray:
    """Per row, (max − min) / max over its finite values (0 where all are zero; NaN with fewer than
    :data:`STALL_MIN_STEPS`)."""
    spread = []
    for row in window:
        row = np.abs(row[np.isfinite(row)])
        if row.size < STALL_MIN_STEPS:
            spread.append(math.nan)
        elif row.max() == 0:
            spread.append(0.0)
        else:
            spread.append(float((row.max() - row.min()) / row.max()))
    return np.array(spread)


def _stalled(history, norm, layers, steps, stat, words) -> list[Finding]:
    """``stalled``: a layer whose norm, its bias gradient ‖∂C/∂b‖ (``delta_norm``) and its weight gradient
    ‖∂C/∂W‖ (``weight_grad_norm``), where the run has them, all moved less than :data:`STALL_RANGE` over the
    last half of the steps while the others' norms moved. ‖δ‖ alone can be constant by the loss's
    construction (L1, Huber beyond its δ, hinge, a linear critic: ‖δ_n‖ = 1/N for every sample) while the
    layer learns: its gradients still move with the batch."""
    if len(layers) < 2:
        return []
    start = len(steps) // 2
    window = norm[:, start:]
    if window.shape[1] < STALL_MIN_STEPS:
        return []
    spread = _spread(window)
    flat = [i for i in range(len(layers)) if np.isfinite(spread[i]) and spread[i] < STALL_RANGE]
    learning = set()
    for other in ("delta_norm", "weight_grad_norm"):
        array = _array(history, other) if other != stat else None
        if array is not None:
            moved = _spread(array[:, start:])
            learning |= {i for i in flat if np.isfinite(moved[i]) and moved[i] >= STALL_RANGE}
    moving = [spread[i] for i in range(len(layers)) if i not in flat and np.isfinite(spread[i])]
    flat = [i for i in flat if i not in learning]
    if not flat or not moving or np.median(moving) < MOVING_RANGE:
        return []
    window_steps = steps[len(steps) // 2 :]
    names = [layers[i] for i in flat]
    zeros = [layers[i] for i in flat if np.nanmax(window[i]) == 0]
    message = (
        f"δ stopped moving in {', '.join(names)}: {words} changed by less than {_pct(STALL_RANGE)} over "
        f"{_span(window_steps)} ({len(window_steps)} logged steps)"
        + (f", exactly zero in {', '.join(zeros)}" if zeros else "")
        + f", while the other layers' changed by {_pct(float(np.median(moving)))} (median)"
        + (", and so did its ‖∂C/∂b‖ and ‖∂C/∂W‖ where the run has them" if stat != "delta_norm" else "")
        + ". A layer whose δ does not change with the batch is cut off from the loss: dead units, a saturated "
        "activation, a detached path."
    )
    return [Finding("stalled", names, window_steps, [float(spread[i]) for i in flat], message, stat)]


def _zero_bias_gradient(history, layers, steps) -> list[Finding]:
    bias, sample = _array(history, "delta_norm"), _array(history, "delta_sample_norm_mean")
    if bias is None or sample is None:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sample > 0, bias / sample, np.nan)
    hits = []
    for i in range(len(layers)):
        row = ratio[i][np.isfinite(ratio[i])]
        if row.size and np.median(row) < CANCEL_RATIO:
            hits.append(i)
    if not hits:
        return []
    names = [layers[i] for i in hits]
    med_bias = [float(np.nanmedian(bias[i])) for i in hits]
    med_sample = float(np.nanmedian(sample[hits]))
    return [
        Finding(
            "zero_bias_gradient",
            names,
            steps,
            med_bias,
            f"information: the bias of {', '.join(names)} gets (almost) no gradient: ‖Σ_n δ_n‖ = ‖∂C/∂b‖ (BP3) is "
            f"{_e(max(med_bias))} at most (median over steps) while the mean per-sample ‖δ_n‖ is {_e(med_sample)}: "
            "the δ_n cancel over the batch. This is not a vanishing δ; it is what a loss unchanged by a shift of "
            "the layer's output shared by the batch gives, e.g. the key projection before softmax (softmax is "
            "unchanged by a shift shared by all keys).",
            "delta_norm",
        )
    ]


def _ok(history, norm, chains, ratio, trend, layers, steps, stat, words) -> Finding:
    parts = []
    values: list[float] = []
    if norm is not None:
        values = [float(v) for v in norm[:, -1]]
    if norm is not None and chains is not None:
        if not chains:
            parts.append(
                f"no chain of {MIN_GAINS + 1} or more linked layers in the data flow ({_count(len(history['links']), 'link')}"
                "): vanishing and exploding across layers not judged"
            )
        else:
            chain = max(chains, key=len)
            chain_ratio, _ = _link_gains(norm, chain)
            finite = np.nonzero(np.isfinite(chain_ratio))[0]
            if finite.size:
                a, b = int(finite[0]), int(finite[-1])
                parts.append(
                    f"along {'the one chain' if len(chains) == 1 else f'the longest of the {len(chains)} chains'} of "
                    f"linked layers ({_chain_words(layers, chain)}, "
                    f"{len(chain) - 1} gains), {words} of {layers[chain[0]]} / {layers[chain[-1]]} = "
                    f"{_g(chain_ratio[a])} at step {steps[a]}, {_g(chain_ratio[b])} at step {steps[b]} (vanishing: "
                    f"below {VANISHING_RATIO:g} with {_pct(TREND)} of the gains below 1; exploding: above "
                    f"{EXPLODING_RATIO:g} with {_pct(TREND)} above 1)"
                )
    if ratio is not None:
        finite = np.nonzero(np.isfinite(ratio))[0]
        if finite.size:
            a, b = int(finite[0]), int(finite[-1])
            parts.append(
                f"{words} of {layers[0]} / {layers[-1]} = {_g(ratio[a])} at step {steps[a]}, {_g(ratio[b])} at step "
                f"{steps[b]}, rank correlation of the norm with depth {_g(trend[a])} and {_g(trend[b])} (vanishing: "
                f"a ratio below {VANISHING_RATIO:g} with a correlation of {TREND:g} or more; exploding: above "
                f"{EXPLODING_RATIO:g} with -{TREND:g} or less; no data-flow links in this log, the layers "
                "compared in network order)"
            )
            values = [float(v) for v in norm[:, b]]
    _, median_gain, with_gain = _gains_below_one(history)
    if math.isfinite(median_gain):
        parts.append(f"median gain {_g(median_gain)} ({len(with_gain)} of the {len(layers)} layers have one)")
    dead = _array(history, "dead_fraction")
    if dead is not None and np.isfinite(dead).any():
        i = int(np.nanargmax(np.nanmax(np.where(np.isfinite(dead), dead, -1.0), axis=1)))
        parts.append(f"largest dead fraction {_pct(float(np.nanmax(dead[i])))} ({layers[i]})")
    if "delta_nonfinite" in history:
        parts.append("every δ finite")
    detail = "; ".join(parts) if parts else "no δ norm in this run to judge"
    return Finding("ok", layers, [steps[0], steps[-1]], values, f"no problem found: {detail}.", stat or "")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _findings(runs: Mapping[str, History], findings: Mapping[str, list[Finding]] | None) -> dict[str, list[Finding]]:
    return {name: (findings[name] if findings is not None else analyze(h)) for name, h in runs.items()}


def format_report(
    runs: Mapping[str, History], findings: Mapping[str, list[Finding]] | None = None, width: int = 100
) -> str:
    """The report as text: per run, its layers and steps, then each finding (analyzed here unless given),
    problems in capitals, each wrapped to ``width`` columns."""
    findings = _findings(runs, findings)
    blocks = []
    for name, history in runs.items():
        layers, steps = history["layers"], history["steps"]
        span = f"{len(steps)} logged steps ({_span(steps)})" if steps else "no logged step"
        shown = layers if len(layers) <= 8 else [*layers[:3], "…", *layers[-2:]]
        lines = [f"run {name}: {len(layers)} layers ({', '.join(shown)}), {span}"]
        for warning in history.get("warnings", []):
            lines.append(_wrap(warning, "  warning: ", width))
        for f in findings[name]:
            label = f.kind.upper() if f.problem else f.kind
            lines.append(
                textwrap.fill(
                    f.message,
                    width=width,
                    initial_indent=f"  {label}: ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
            )
        blocks.append("\n".join(lines))
    warned = sum(len(history.get("warnings", [])) for history in runs.values())
    problems = sum(f.problem for fs in findings.values() for f in fs)
    with_problems = [name for name, fs in findings.items() if any(f.problem for f in fs)]
    summary = (
        f"{problems} problem{'s' if problems != 1 else ''} in {len(with_problems)} of {len(runs)} "
        f"run{'s' if len(runs) != 1 else ''}" + (f" ({', '.join(with_problems)})" if with_problems else "")
    ) + (f"; {warned} warning{'s' if warned != 1 else ''} (see above)" if warned else "")
    return "\n\n".join(blocks) + f"\n\ntorchbp report: {summary}"


def _wrap(text: str, label: str, width: int) -> str:
    return textwrap.fill(
        text,
        width=width,
        initial_indent=label,
        subsequent_indent="      ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Inf
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def to_json(runs: Mapping[str, History], findings: Mapping[str, list[Finding]] | None = None) -> dict[str, Any]:
    """The report as a JSON-able dict: ``{"runs": {name: {"layers", "steps", "warnings": [...], "findings":
    [...]}}}``.

    ``warnings`` are the run's lines about what could not be read (a damaged event file: see
    :func:`read_logdir`), empty when there are none. Each finding is :class:`Finding`'s fields plus
    ``"problem"`` (bool); NaN and Inf are ``null``.
    """
    findings = _findings(runs, findings)
    out: dict[str, Any] = {"runs": {}}
    for name, history in runs.items():
        out["runs"][name] = {
            "layers": list(history["layers"]),
            "steps": [int(s) for s in history["steps"]],
            "warnings": list(history.get("warnings", [])),
            "findings": [{**_jsonable_dict(asdict(f)), "problem": f.problem} for f in findings[name]],
        }
    return out


def _jsonable_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in d.items()}

"""torchbp.picture: the δ map (one image row per layer, log10 of the norms, masked non-finite values), the
PNG it writes, and the message when matplotlib is missing."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from torchbp import picture

matplotlib = pytest.importorskip("matplotlib", reason="torchbp.picture draws with matplotlib")
from matplotlib.image import AxesImage, imread  # noqa: E402

LAYERS = ["hidden1", "hidden2", "output"]


def _history(steps=(0, 10, 20, 30), scale=1.0) -> dict:
    norms = [[scale * 10.0 ** (k - 3) * (1 + 0.1 * s) for s in range(len(steps))] for k in range(len(LAYERS))]
    return {"steps": list(steps), "layers": list(LAYERS), "delta_norm": norms}


def _maps(fig) -> list[AxesImage]:
    return [image for ax in fig.axes for image in ax.get_images()]


def test_one_image_row_per_layer_with_log10_of_the_norms():
    history = _history()
    fig = picture.delta_map_figure({"sigmoid": history})
    (image,) = _maps(fig)
    data = image.get_array()
    assert data.shape == (len(LAYERS), len(history["steps"]))
    np.testing.assert_allclose(data.filled(np.nan), np.log10(history["delta_norm"]))
    ax = image.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS  # input side first, at the top
    assert ax.get_ylim()[0] > ax.get_ylim()[1], "row 0 (the input side) should be at the top"
    assert image.colorbar is not None and image.colorbar.ax.get_ylabel() == picture.COLORBAR_LABEL
    lines = [ax for ax in fig.axes if ax.get_yscale() == "log"]
    assert len(lines) == 1 and [t.get_text() for t in lines[0].get_legend().get_texts()] == LAYERS


def test_runs_side_by_side_share_one_colour_scale():
    fig = picture.delta_map_figure({"sigmoid": _history(), "relu": _history(scale=100.0)}, title="two runs")
    sigmoid, relu = _maps(fig)
    assert sigmoid.get_clim() == relu.get_clim()
    low, high = sigmoid.get_clim()
    assert low == pytest.approx(math.log10(1e-3)) and high == pytest.approx(math.log10(100 * 10**-1 * 1.3))
    assert [image.axes.get_title(loc="left").split(":")[0] for image in (sigmoid, relu)] == ["sigmoid", "relu"]
    assert fig.get_suptitle() == "two runs"


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, None], ids=["nan", "inf", "zero", "missing"])
def test_non_finite_values_are_masked(bad):
    history = _history()
    history["delta_norm"][1][2] = bad
    fig = picture.delta_map_figure({"run": history})
    (image,) = _maps(fig)
    mask = np.ma.getmaskarray(image.get_array())
    assert mask[1, 2] and mask.sum() == 1
    assert image.get_cmap().get_bad() == pytest.approx(matplotlib.colors.to_rgba(picture.MASKED_COLOR))
    assert len(picture.render_png(fig)) > 1000  # and it still draws


def test_all_values_missing_and_uneven_steps_still_draw():
    history = {"steps": [0, 1, 5, 100], "layers": ["a"], "delta_norm": [[math.nan] * 4]}
    assert picture.render_png(picture.delta_map_figure({"run": history})).startswith(b"\x89PNG")
    empty = {"steps": [], "layers": ["a", "b"], "delta_norm": []}
    assert picture.render_png(picture.delta_map_figure({"run": empty})).startswith(b"\x89PNG")


def test_bad_history_says_what_was_expected():
    history = _history()
    history["delta_norm"] = history["delta_norm"][:2]
    with pytest.raises(ValueError, match=r"shape \(len\(layers\), len\(steps\)\) = \(3, 4\), got \(2, 4\)"):
        picture.delta_map_figure({"run": history})
    with pytest.raises(ValueError, match="keys steps, layers, delta_norm"):
        picture.delta_map_figure({"run": {"steps": []}})


def test_png_file_decodes_with_a_sane_size(tmp_path):
    path = tmp_path / "sub" / "delta_map.png"
    assert picture.save_delta_map({"sigmoid": _history(), "relu": _history()}, path) == str(path)
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert 800 <= width <= 2000 and 300 <= height <= 1500, pixels.shape
    assert path.stat().st_size < 200_000
    assert pixels.std() > 0.05, "an empty picture"


def test_missing_matplotlib_is_one_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as info:
        picture.delta_map_figure({"run": _history()})
    message = str(info.value)
    assert "\n" not in message and "pip install matplotlib" in message and 'pip install "torchbp[demo]"' in message

"""The report's figures show what they claim, checked on the decoded PNG pixels: the ROC/PR panels
draw the curves, the overlay's map panel shows the map (not the mask), and the overlays pick the
images their labels call for."""

import io

import numpy as np
from PIL import Image

from pipeline.evaluation import report
from pipeline.stages.evaluate import overlay_pick


def render(fig) -> tuple[np.ndarray, list]:
    """The figure's PNG as an (H, W, 3) array, and each axes' pixel box (x0, y0, x1, y1) in it (rows
    counted from the top), taken before the figure is freed."""
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    boxes = []
    for ax in fig.axes:
        b = ax.get_window_extent()
        boxes.append((int(b.x0) + 2, int(height - b.y1) + 2, int(b.x1) - 2, int(height - b.y0) - 2))
    data = report.png_bytes(fig)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int), boxes


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels that are neither white, black nor grey: a drawn coloured line."""
    return (pixels.max(axis=-1) - pixels.min(axis=-1)) > 60


def curve_pixels(curves) -> list[bool]:
    """Whether a coloured pixel lies near (0.2, 0.8) of the ROC panel and (0.8, 0.8) of the PR panel."""
    fig = report.roc_pr_figure(curves, "t")
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    points = [fig.axes[0].transData.transform((0.2, 0.8)), fig.axes[1].transData.transform((0.8, 0.8))]
    pixels, _ = render(fig)
    out = []
    for x, y in points:
        r, c = int(round(height - y)), int(round(x))
        out.append(bool(coloured(pixels[r - 3:r + 4, c - 3:c + 4]).any()))
    return out


def test_roc_pr_panels_draw_each_curve_where_its_points_are():
    # curves through (0.2, 0.8) and (0.8, 0.8), points no frame, grid or chance diagonal passes through
    roc = [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 0.2, "tpr": 0.8}, {"fpr": 1.0, "tpr": 1.0}]
    pr = [{"recall": 0.0, "precision": 1.0}, {"recall": 0.8, "precision": 0.8}, {"recall": 1.0, "precision": 0.5}]
    assert curve_pixels({"image": {"roc": roc, "pr": pr}}) == [True, True]
    # an undefined curve draws nothing there: the check above is not met by the axes alone
    assert curve_pixels({"image": {"roc": [], "pr": []}}) == [False, False]


def test_overlay_map_panel_shows_the_map_brighter_inside_the_defect():
    s = 32
    image = np.full((s, s, 3), 128, np.uint8)
    mask = np.zeros((s, s), np.uint8)
    mask[4:12, 4:12] = 1  # the ground truth: top left
    amap = np.zeros((s, s), np.float32)
    amap[20:28, 20:28] = 1.0  # the map: bottom right, elsewhere than the mask
    pixels, boxes = render(report.overlays_figure([(image, mask, amap, "x")], "t"))
    _, mask_box, map_box = boxes  # one column: image, ground truth, map over image

    def region(box, rows, cols):
        x0, y0, x1, y1 = box
        h, w = y1 - y0, x1 - x0
        return pixels[y0 + int(rows[0] * h / s):y0 + int(rows[1] * h / s), x0 + int(cols[0] * w / s):x0 + int(cols[1] * w / s)]

    # the mask panel is white where the mask is, dark where the map is
    assert region(mask_box, (5, 11), (5, 11)).mean() > 200 and region(mask_box, (21, 27), (21, 27)).mean() < 60
    # the map panel (jet over the image) is red where the map is high and blue where it is low
    hot, cold = region(map_box, (21, 27), (21, 27)), region(map_box, (5, 11), (5, 11))
    assert hot[..., 0].mean() > hot[..., 2].mean() + 60
    assert cold[..., 2].mean() > cold[..., 0].mean() + 30
    # so the two panels differ where the defect is
    assert np.abs(region(mask_box, (5, 11), (5, 11)) - cold).mean() > 40


def test_overlay_pick_follows_the_labels():
    labels = np.array([0] * 10 + [1] * 10)  # anomalies only at the end: a pick that ignored labels misses them
    picked = overlay_pick(labels, 6)
    assert picked == [0, 1, 2, 10, 11, 12]
    assert overlay_pick(np.array([1, 1, 0]), 6) == [0, 1, 2]  # fewer images than asked: all of them
    assert overlay_pick(np.array([0, 0, 0, 0, 1]), 4) == [0, 1, 2, 4]  # one anomaly: it, and normals fill the rest

"""The figures of `benchmark explain`: assignment maps, cluster usage, retrieval galleries.

Drawn on matplotlib's Agg backend (never pyplot), from plain records (`ViewSample`,
`GalleryRow`) that `explain.py` and the report fill, so tests can check what a figure
shows without reading pixels. Images keep their aspect ratio: panels are sized by it.
One palette serves every figure of a model: cluster k has the same colour on the ground
and from above, in the maps and under the usage bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TOP_K = 5  # tiles per gallery row; the ground truth's frame is green when rank < TOP_K
ONE_VIEW = 0.5  # a patch is one-view when more than this share of its pixels is masked
FOUND, MISSED = "#1a9641", "#d7191c"  # green / red frames of the ground truth
# Greys for the two views, so that no bar takes a cluster's colour.
VIEW_COLOURS = {"ground": "#3a3a3a", "aerial": "#b0b0b0"}
MASK_COLOUR = "#00e5ff"
GALLERY_PX = 96  # gallery panel height: canvas pixels, saved one to one
# Gallery layout in canvas pixels: space between panels, gap before a missed ground truth,
# one caption line and about one character (9 points at 100 dpi), frame widths (the ground
# truth's, other tiles').
_SPACE, _GAP, _LINE, _CHAR, _WIDE, _THIN = 12, 24, 15, 7, 5, 1
_GREY = "#bbbbbb"  # the frame of a tile that is not the ground truth


@dataclass
class ViewSample:
    """One image of one view as the head saw it, and what the head did with its patches."""

    view: str
    path: Path
    index: int  # the image's index in its list (queries or gallery)
    image: np.ndarray  # [H, W, 3] in 0..1: the model input, denormalised
    assign: np.ndarray | None  # [h, w, K]: each patch's mass per cluster (dustbin last)
    one_view: np.ndarray | None = None  # [H, W]: share of each pixel only this view shows
    one_view_share: np.ndarray | None = None  # [h, w]: the same per patch
    classes: np.ndarray | None = None  # [h, w]: each patch's majority annotation class

    def strongest(self, m: int) -> np.ndarray:
        """`[h, w]`: each patch's strongest cluster, the dustbin left out."""
        return self.assign[..., :m].argmax(axis=-1)


@dataclass
class GalleryTile:
    path: Path
    id: str
    score: float
    positive: bool


@dataclass
class GalleryRow:
    """One query, its top-k tiles and its ground truth, as one row of a gallery."""

    query: Path
    query_id: str
    rank: int
    tiles: list[GalleryTile]
    gt: GalleryTile
    label: str = ""  # which model retrieved this row (discordant galleries show two)
    query_image: np.ndarray | None = field(default=None, repr=False)  # as the model saw it

    @property
    def found(self) -> bool:
        return 0 <= self.rank < TOP_K

    @property
    def frame(self) -> str:
        """The ground truth's frame colour: green when found in the top k, red otherwise."""
        return FOUND if self.found else MISSED

    @property
    def gt_slot(self) -> int | None:
        """Where the ground truth sits among the tiles, or None (then it is drawn after them)."""
        for i, tile in enumerate(self.tiles):
            if tile.id == self.gt.id:
                return i
        return None


def _pct(value: Any) -> str:
    """`44%`, or `n/a` for a share of nothing (NaN or None)."""
    return f"{value:.0f}%" if isinstance(value, float | int) and math.isfinite(value) else "n/a"


def _figure(width: float, height: float, layout: str | None = "constrained", **kwargs: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def palette(m: int) -> np.ndarray:
    """`[m, 3]` RGB in 0..1: tab10 / tab20 for few clusters, evenly spaced hues beyond."""
    from matplotlib import colormaps

    if m <= 10:
        return np.asarray(colormaps["tab10"].colors[:m])
    if m <= 20:
        return np.asarray(colormaps["tab20"].colors[:m])
    import seaborn as sns

    return np.asarray(sns.color_palette("husl", m))


def _cluster_colourbar(fig, cax, m: int, colours: np.ndarray) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    mappable = ScalarMappable(BoundaryNorm(np.arange(m + 1) - 0.5, m), ListedColormap(colours))
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal",
                       ticks=np.arange(0, m, max(1, math.ceil(m / 16))))
    bar.set_label("cluster index (its colour in the cluster rows)")


def _patch_extent(image: np.ndarray) -> tuple[float, float, float, float]:
    h, w = image.shape[:2]
    return (0.0, float(w), float(h), 0.0)


def _grid_lines(ax, image: np.ndarray, grid: tuple[int, int]) -> None:
    """Thin lines between patches, when there are few enough to see them."""
    gh, gw = grid
    if gh * gw > 400:
        return
    h, w = image.shape[:2]
    for r in range(1, gh):
        ax.axhline(r * h / gh, color="white", linewidth=0.4, alpha=0.6)
    for c in range(1, gw):
        ax.axvline(c * w / gw, color="white", linewidth=0.4, alpha=0.6)


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _outline_mask(ax, sample: ViewSample) -> None:
    """The content only this view shows, when the image has a mask: outlined and hatched."""
    mask = sample.one_view
    if mask is None or mask.max() <= 0.5:
        return
    h, w = mask.shape
    x, y = np.arange(w) + 0.5, np.arange(h) + 0.5
    hatched = ax.contourf(x, y, mask, levels=[0.5, 1.5], colors="none", hatches=["////"])
    hatched.set_edgecolor(MASK_COLOUR)
    hatched.set_linewidth(0.0)
    if mask.min() < 0.5:
        ax.contour(x, y, mask, levels=[0.5], colors=MASK_COLOUR, linewidths=1.0)


def _draw_clusters(ax, sample: ViewSample, m: int, colours: np.ndarray) -> None:
    """The image in grey (so that only clusters carry colour), each patch tinted by its
    strongest cluster."""
    strongest = sample.strongest(m)
    overlay = np.concatenate([colours[strongest], np.full((*strongest.shape, 1), 0.62)], axis=-1)
    extent = _patch_extent(sample.image)
    ax.imshow(sample.image.mean(axis=-1), cmap="gray", vmin=0, vmax=1, extent=extent)
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    _grid_lines(ax, sample.image, strongest.shape)
    _outline_mask(ax, sample)
    _clean(ax)


def _draw_dustbin(ax, sample: ViewSample):
    extent = _patch_extent(sample.image)
    ax.imshow(sample.image.mean(axis=-1), cmap="gray", vmin=0, vmax=1, extent=extent)
    shown = ax.imshow(sample.assign[..., -1], cmap="magma", vmin=0, vmax=1, alpha=0.72,
                      extent=extent, interpolation="nearest")
    _outline_mask(ax, sample)
    _clean(ax)
    return shown


def _dustbin_caption(sample: ViewSample, what: str, compact: bool) -> str:
    """The dustbin row's title: its mean share, and with a mask its mass on one-view patches."""
    bins = sample.assign[..., -1]
    text = f"{what}: dustbin share per patch, mean {100 * bins.mean():.0f}%"
    if compact:
        text = f"{what}: dustbin, mean {100 * bins.mean():.0f}%"
    if bins.sum() <= 0:
        return text + "\n(as many patches as clusters: nothing left for the dustbin)"
    if sample.one_view_share is not None:
        flags = sample.one_view_share > ONE_VIEW
        if flags.any():
            on, base = 100 * bins[flags].sum() / bins.sum(), 100 * flags.mean()
            text += (f"\none-view: {on:.0f}% of mass,\n{base:.0f}% of patches" if compact else
                     f"\n{on:.0f}% of its mass on one-view patches ({base:.0f}% of patches)")
        else:
            text += "\nno one-view patches"
    return text


def assignment_figure(pairs: list[tuple[ViewSample, ViewSample]], m: int, dustbin: bool,
                      title: str, note: str, path: Path, numbers: dict[str, Any] | None = None):
    """Per pair: the panorama and its aerial tile, each patch in its strongest cluster's
    colour over the image; with a dustbin, a second row of each patch's dustbin share
    (the one-view mask's outline over it, when there is a mask). Scales at the bottom."""
    import textwrap

    ground, aerial = pairs[0]
    ratio_g = ground.image.shape[1] / ground.image.shape[0]
    ratio_a = aerial.image.shape[1] / aerial.image.shape[0]
    rows = len(pairs) * (2 if dustbin else 1)
    panel_h = min(2.3, 11.0 / (ratio_g + ratio_a))
    width = max(8.0, panel_h * (ratio_g + ratio_a) + 0.8)
    fig = _figure(width, panel_h * rows + 0.55 * rows + 2.2)
    panels, scales = fig.subfigures(2, 1, height_ratios=[panel_h * rows + 0.55 * rows + 1.0, 1.2])
    axes = panels.subplots(rows, 2, squeeze=False, gridspec_kw={"width_ratios": [ratio_g, ratio_a]})
    colours = palette(m)
    shown = None
    for i, (g, a) in enumerate(pairs):
        top = axes[i * (2 if dustbin else 1)]
        _draw_clusters(top[0], g, m, colours)
        _draw_clusters(top[1], a, m, colours)
        top[0].set_title(f"pair {g.path.stem}: ground panorama, strongest cluster per patch",
                         fontsize="small")
        top[1].set_title("its aerial tile", fontsize="small")
        top[0].set_ylabel("clusters", fontsize="small")
        if dustbin:
            low = axes[i * 2 + 1]
            shown = _draw_dustbin(low[0], g)
            _draw_dustbin(low[1], a)
            low[0].set_title(_dustbin_caption(g, "ground", ratio_g < 2 * ratio_a), fontsize="small")
            low[1].set_title(_dustbin_caption(a, "aerial", True), fontsize="small")
            low[0].set_ylabel("dustbin", fontsize="small")
    bars = scales.subplots(1, 2 if dustbin else 1, squeeze=False)[0]
    _cluster_colourbar(fig, bars[0], m, colours)
    if shown is not None:
        bar = fig.colorbar(shown, cax=bars[1], orientation="horizontal")
        bar.set_label("dustbin share of the patch's mass (dustbin rows)")
    if any(s.one_view is not None for pair in pairs for s in pair):
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        scales.legend([(Patch(facecolor="none", edgecolor=MASK_COLOUR, hatch="////", linewidth=0),
                        Line2D([], [], color=MASK_COLOUR, linewidth=1.5))],
                      ["hatched and outlined: content only this view shows (one-view mask)"],
                      loc="outside lower center", fontsize="small", frameon=False)
    summary = ""
    if numbers and numbers.get("dustbin"):
        both = (numbers["dustbin"].get("unmatched") or {}).get("both")
        summary = (f"Over {numbers.get('pairs_measured', len(pairs))} pairs the dustbin takes "
                   f"{numbers['dustbin']['mean_share']['both']:.0f}% of the mass")
        if both:
            summary += (f", {_pct(both['dustbin_on_unmatched'])} of it on one-view patches, which "
                        f"are {_pct(both['unmatched_base_rate'])} of the patches")
        summary += "."
        classes = numbers["dustbin"].get("classes")
        if classes:
            summary += " Ground patches by annotation class, share of the dustbin's mass / of the " \
                       "patches: " + ", ".join(f"{c['class']} {_pct(c['share_of_dustbin_mass'])}/"
                                               f"{_pct(c['share_of_patches'])}" for c in classes) + "."
    wrap = max(60, int(width * 11))
    text = "\n".join(textwrap.fill(part, wrap) for part in (title, note, summary) if part)
    fig.suptitle(text, fontsize="medium")
    fig.savefig(path, dpi=110)
    return fig


def usage_figure(numbers: dict[str, Any], title: str, note: str, path: Path):
    """Per cluster, the share of each view's patches whose strongest cluster it is; a
    strip of the maps' palette under the bars; clusters only one view uses marked."""
    m = numbers["num_clusters"]
    usage = numbers["cluster_usage"]
    colours = palette(m)
    import textwrap

    width = max(8.0, 0.42 * m + 2.5)
    fig = _figure(width, 4.6)
    ax, strip = fig.subplots(2, 1, gridspec_kw={"height_ratios": [12, 1]}, sharex=True)
    x = np.arange(m)
    top = max(max(usage["ground"]), max(usage["aerial"]), 1.0)
    for offset, view in ((-0.2, "ground"), (0.2, "aerial")):
        ax.bar(x + offset, usage[view], width=0.4, color=VIEW_COLOURS[view], label=view)
    for view, clusters in (numbers["clusters_one_view_only"] or {}).items():
        for k in clusters:
            ax.text(k, top * 1.04, f"{view}\nonly", ha="center", va="bottom", color=MISSED,
                    fontsize="x-small")
    ax.set_ylim(0, top * 1.22)
    ax.set_ylabel("patches whose strongest\ncluster is k (%)")
    ax.legend(title="view", fontsize="small")
    wrap = int(width * 11)
    ax.set_title("\n".join(textwrap.fill(part, wrap) for part in (title, note)), fontsize="medium")
    strip.imshow(colours[None], aspect="auto", extent=(-0.5, m - 0.5, 0, 1))
    strip.set_yticks([])
    strip.set_xticks(x if m <= 32 else x[::max(1, m // 16)])
    strip.set_xlabel("cluster k (strip: its colour in the assignment maps)")
    fig.savefig(path, dpi=110)
    return fig


def _thumbnail(path: Path, longest: int = 320) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((longest * 4, longest))  # panoramas keep their width
        return np.asarray(im)


@dataclass
class GalleryPanel:
    """One image on a gallery canvas: its box in canvas pixels (the frame lies outside it)
    and the caption written over it."""

    row: int
    kind: str  # "query", "tile" or "gt" (the ground truth drawn after the tiles: missed)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    caption: str
    colour: str = "black"  # the caption's
    frame: str | None = None
    frame_width: int = 0


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` (uint8, or float in 0..1) resized to fit in height x width, aspect kept."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    scale = min(height / image.shape[0], width / image.shape[1])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def gallery_canvas(rows: list[GalleryRow], height: int = GALLERY_PX
                   ) -> tuple[np.ndarray, list[GalleryPanel]]:
    """A gallery as one RGB image (uint8, white ground, frames drawn in) and its panels.

    Each row: the query in a column as wide as the widest query, the top-k tiles, and,
    when the ground truth is not among them, a gap and the ground truth. Over each row a
    band for the captions, as many lines high as the longest caption."""
    from matplotlib.colors import to_rgb

    queries = [_thumbnail(row.query) if row.query_image is None else row.query_image
               for row in rows]
    ranks = ["not evaluated" if row.rank < 0 else f"rank {row.rank}" for row in rows]
    captions = [f"query {row.query_id} ({rank})" + (f"\n{row.label}" if row.label else "")
                for row, rank in zip(rows, ranks, strict=True)]
    # The query column fits the widest query and its caption (a narrow crop's caption
    # would otherwise run over the tiles').
    query_w = max(max(round(height * q.shape[1] / q.shape[0]) for q in queries),
                  max(len(text) for caption in captions for text in caption.split("\n")) * _CHAR)
    k = max(TOP_K, max(len(r.tiles) for r in rows))
    tiles_x = _SPACE + query_w + _SPACE
    gt_x = tiles_x + k * (height + _SPACE) + _GAP
    width = gt_x + height + _SPACE if any(r.gt_slot is None for r in rows) else gt_x - _GAP
    # Per row: (kind, image, x, box width, caption, caption colour, frame, frame width).
    specs = []
    for row, query, rank, caption in zip(rows, queries, ranks, captions, strict=True):
        slot = row.gt_slot
        line = [("query", query, _SPACE, query_w, caption, "black", None, 0)]
        for j, tile in enumerate(row.tiles):
            gt = j == slot
            line.append(("tile", _thumbnail(tile.path), tiles_x + j * (height + _SPACE), height,
                         f"#{j + 1}  s={tile.score:.2f}" + ("\nground truth" if gt else ""),
                         "black", row.frame if gt else _GREY, _WIDE if gt else _THIN))
        if slot is None:
            line.append(("gt", _thumbnail(row.gt.path), gt_x, height,
                         f"ground truth\n{rank}, s={row.gt.score:.2f}", row.frame, row.frame, _WIDE))
        specs.append(line)
    lines = max(caption.count("\n") + 1 for line in specs for _, _, _, _, caption, *_ in line)
    band = _WIDE + 6 + lines * _LINE
    pitch = band + height + _WIDE + 1
    canvas = np.full((len(rows) * pitch, width, 3), 255, np.uint8)
    panels = []
    for i, line in enumerate(specs):
        y = i * pitch + band
        for kind, image, x, box_w, caption, colour, frame, frame_w in line:
            image = _fit(image, height, box_w)
            h, w = image.shape[:2]
            x0, y0 = x + (box_w - w) // 2, y + (height - h) // 2
            if frame is not None:
                rgb = np.round(np.asarray(to_rgb(frame)) * 255)
                canvas[y0 - frame_w:y0 + h + frame_w, x0 - frame_w:x0 + w + frame_w] = rgb
            canvas[y0:y0 + h, x0:x0 + w] = image
            panels.append(GalleryPanel(i, kind, (x0, y0, x0 + w, y0 + h), caption, colour,
                                       frame, frame_w))
    return canvas, panels


def gallery_figure(rows: list[GalleryRow], title: str, path: Path):
    """Each row: the query, its top-k tiles (best first, with their similarity), and the
    ground truth framed green in place when found (rank < k), else drawn red after them.

    One axes shows the `gallery_canvas` at one canvas pixel per output pixel (one image
    is cheap to draw and save; an axes per panel cost seconds), captions over the panels."""
    canvas, panels = gallery_canvas(rows)
    h, w = canvas.shape[:2]
    fig = _figure(w / 100, h / 100, layout=None, dpi=100)
    heading = fig.suptitle(f"{title}\nframe: the ground truth, green when in the top {TOP_K} "
                           f"(rank < {TOP_K}), red otherwise; s = cosine similarity",
                           fontsize="medium", va="top")
    # The figure is as wide as the canvas or the title, and tall enough for both.
    extent = heading.get_window_extent(fig.canvas.get_renderer())
    fig_w, fig_h = max(w, math.ceil(extent.width) + 24), h + math.ceil(extent.height) + 14
    fig.set_size_inches(fig_w / 100, fig_h / 100)
    heading.set_y(1 - 6 / fig_h)
    ax = fig.add_axes(((fig_w - w) // 2 / fig_w, 0, w / fig_w, h / fig_h))
    opaque = np.full((h, w, 1), 255, np.uint8)  # imshow draws RGBA bytes as they are: 40% faster
    ax.imshow(np.concatenate([canvas, opaque], axis=2), interpolation="nearest")
    ax.set_axis_off()
    for panel in panels:
        x0, y0, x1, _ = panel.box
        ax.text((x0 + x1) / 2 - 0.5, y0 - panel.frame_width - 3, panel.caption, ha="center",
                va="bottom", fontsize=9 if panel.kind == "query" else 8, color=panel.colour,
                parse_math=False)
    # zlib level 1: a quarter of the default level's encoding time, files ~5% larger.
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 1})
    return fig

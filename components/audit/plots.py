"""The audit report's plots, as PNG bytes.

Rendered with matplotlib's Agg canvas directly, never pyplot, so no global backend state is
touched. Text from the records goes through ``_label`` (no mathtext, bounded length).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lid_engine import LID

from .records import VersionAudit, finite, member_positions, task_names

__all__ = ["MAX_HISTOGRAMS", "WidthPlot", "plot_accuracy", "plot_checkpoint_curve", "plot_width_histograms"]

MAX_HISTOGRAMS = 16  # parameter tensors shown in the width histogram grid (largest first)
_LABEL_CHARS = 24
_STATUS_COLOURS = {"promoted": "#2e7d32", "champion": "#1565c0", "blocked": "#c62828", "pending": "#9e9e9e"}


@dataclass
class WidthPlot:
    """``plot_width_histograms``' result.

    ``png``: one panel per parameter tensor with some width (None when every width is 0);
    ``zero``: ``(name, coordinates)`` of the tensors whose every width is 0 (no panel: an empty
    histogram says nothing that one line of text does not); ``omitted``: tensors with width not
    shown because the grid is full (the smallest ones).
    """

    png: bytes | None
    zero: list[tuple[str, int]]
    omitted: list[str]


def plot_accuracy(records: Sequence[VersionAudit]) -> bytes | None:
    """Certified accuracy (solid) and CP lower bound (dashed) per version, one panel per task, τ line."""
    tasks = task_names(records)
    if not records or not tasks:
        return None
    rows, cols = _grid(len(tasks), 2)
    fig = _new_figure(max(9.0, 6.4 * cols), 4.0 * rows + 0.4)
    x = np.arange(len(records))
    labels = [_label(r.version) for r in records]
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, k + 1)
        acc, lb, taus = [], [], []
        for r in records:
            t = next((t for t in r.tasks if str(t.task) == task), None)
            acc.append(t.certified_accuracy if t is not None and finite(t.certified_accuracy) else np.nan)
            lb.append(t.lower_bound if t is not None and finite(t.lower_bound) else np.nan)
            taus.append(t.tau if t is not None and finite(t.tau) else np.nan)
        ax.plot(x, acc, "-", color="#1565c0", lw=1.8, label="certified accuracy", zorder=2)
        ax.plot(x, lb, "--", color="#6a1b9a", lw=1.5, label="CP lower bound", zorder=2)
        for status in ("promoted", "blocked", "pending", "other"):
            sel = [i for i, r in enumerate(records) if _status_key(r) == status and not np.isnan(acc[i])]
            if sel:
                ax.scatter(x[sel], np.asarray(acc)[sel], s=46, zorder=3, color=_STATUS_COLOURS.get(status, "#616161"),
                           edgecolor="black", linewidth=0.5, label=f"{status} version")
        champ = [i for i, r in enumerate(records) if r.is_champion and not np.isnan(acc[i])]
        if champ:
            ax.scatter(x[champ], np.asarray(acc)[champ], s=220, marker="*", color="#ffb300", edgecolor="black",
                       linewidth=0.6, zorder=4, label="champion")
        # a version that carries the task but has no certified value (e.g. it lies outside that LID)
        uncovered = [i for i, r in enumerate(records) if np.isnan(acc[i]) and any(str(t.task) == task for t in r.tasks)]
        distinct = sorted({v for v in taus if not np.isnan(v)})
        if len(distinct) == 1:
            ax.axhline(distinct[0], color="#c62828", ls=":", lw=1.6, label=f"τ = {distinct[0]:g}", zorder=1)
        elif distinct:  # τ changed between versions: draw it per version
            ax.step(x, taus, where="mid", color="#c62828", ls=":", lw=1.6, label="τ (per version)", zorder=1)
        values = [v for v in acc + lb + taus if not np.isnan(v)]
        lo = max(0.0, (min(values) if values else 0.0) - 0.05)
        ax.set_ylim(lo, 1.005)
        if uncovered:
            ax.scatter(x[uncovered], np.full(len(uncovered), lo + 0.02 * (1.005 - lo)), s=60, marker="X",
                       color="#c62828", zorder=4, label="no certified value (not covered)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30 if len(records) > 6 else 0, ha="right" if len(records) > 6 else "center")
        ax.set_xlabel("model version")
        ax.set_ylabel("certified accuracy")
        ax.set_title(f"task {_label(task)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle("Certified accuracy per version (solid), Clopper–Pearson lower bound (dashed), τ (dotted)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # keep the panels' titles below it
    return _png(fig)


def plot_heldout_accuracy(records: Sequence[VersionAudit]) -> bytes | None:
    """Grouped bars: each version's plain accuracy on each task's held-out data (None without any)."""
    tasks = sorted({t for r in records for t in r.accuracy})
    shown = [r for r in records if r.accuracy]
    if not tasks or not shown:
        return None
    fig = _new_figure(max(7.0, 1.1 * len(shown) * len(tasks) + 2.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(tasks)
    x = np.arange(len(shown))
    colours = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#00838f", "#8d6e63"]
    for k, task in enumerate(tasks):
        values = [r.accuracy.get(task, np.nan) for r in shown]
        bars = ax.bar(x - 0.4 + width * (k + 0.5), values, width * 0.92, color=colours[k % len(colours)],
                      label=f"task {_label(task)}")
        for bar, v in zip(bars, values):
            if not np.isnan(v):
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{_label(r.version)}\n{_status_key(r)}" + (" ★" if r.is_champion else "") for r in shown])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy on held-out data")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.85)
    ax.set_title("Each version on each task's held-out certification data (plain accuracy)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_width_histograms(lid: LID, member: int) -> WidthPlot:
    """Histogram of the coordinate widths of one member, one panel per parameter tensor with width."""
    from matplotlib.ticker import MaxNLocator

    box = lid.members[member]
    widths = {name: box.width(name).detach().to("cpu").double().numpy().ravel() for name in box.names}
    zero = [(n, int(w.size)) for n, w in widths.items() if not (w > 0).any()]
    with_width = [n for n in widths if (widths[n] > 0).any()]
    largest = sorted(with_width, key=lambda n: -widths[n].size)
    shown, omitted = set(largest[:MAX_HISTOGRAMS]), largest[MAX_HISTOGRAMS:]
    shown_in_order = [n for n in box.names if n in shown]  # keep the model's layer order
    if not shown_in_order:
        return WidthPlot(png=None, zero=zero, omitted=omitted)
    rows, cols = _grid(len(shown_in_order), 3)
    fig = _new_figure(max(4.4 * cols, 6.0), 3.0 * rows + 0.6)  # wide enough for the title with one panel
    for k, name in enumerate(shown_in_order):
        ax = fig.add_subplot(rows, cols, k + 1)
        w = widths[name]
        pos = w[w > 0]
        zeros = int((w <= 0).sum())
        log = pos.max() / pos.min() >= 100.0
        nbins = int(min(40, max(8, math.sqrt(pos.size))))
        if log:
            bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()) + 1e-9, nbins + 1)
            ax.hist(pos, bins=bins, color="#1565c0", alpha=0.85)
            ax.set_xscale("log")
        else:
            v = float(pos.mean())
            if np.ptp(pos) <= 1e-4 * pos.max():  # equal up to float rounding: one bar at the value
                ax.hist(np.full_like(pos, v), bins=[v * 0.95, v * 1.05], color="#1565c0", alpha=0.85)
            else:
                ax.hist(pos, bins=nbins, color="#1565c0", alpha=0.85)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useOffset=False)
        ax.set_title(f"{_label(name)}  ({w.size} coords)", fontsize=9)
        ax.set_xlabel("width (upper − lower)" + (", log scale" if log else ""), fontsize=8)
        ax.set_ylabel("coordinates", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom for the note
        ax.tick_params(labelsize=7)
        note = f"mean {w.mean():.3g}, max {w.max():.3g}" + (f"\n{zeros} zero-width" if zeros else "")
        ax.text(0.97, 0.95, note, ha="right", va="top", fontsize=7, transform=ax.transAxes,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0.3})
    fig.suptitle(f"Width per coordinate, LID member {member} (largest width sum)", fontsize=11)
    fig.tight_layout()
    return WidthPlot(png=_png(fig), zero=zero, omitted=omitted)


def plot_checkpoint_curve(lid: LID, highlight: int) -> bytes:
    """Width sum (left axis, log) and certified accuracy per task (right axis, τ dotted) per checkpoint."""
    xs, xlabel = member_positions(lid)
    order = sorted(range(len(xs)), key=lambda i: (xs[i], i))
    x = np.asarray([xs[i] for i in order])
    sums = lid.width_sum()
    ws = np.asarray([sums[i] for i in order], dtype=float)
    fig = _new_figure(8.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    h1 = ax.plot(x, ws, "o-", color="#2e7d32", lw=1.8, label="width sum")
    hi = order.index(highlight)
    h_star = ax.scatter([x[hi]], [ws[hi]], s=200, marker="*", color="#ffb300", edgecolor="black", zorder=4,
                        label=f"largest member ({highlight})")
    if np.all(ws > 0) and ws.max() / ws.min() >= 100:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("width sum of the box", color="#2e7d32")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    handles = h1 + [h_star]
    colours = ["#1565c0", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#4e342e"]
    for k, (t, spec) in enumerate(lid.tasks.items()):
        c = colours[k % len(colours)]
        acc = [lid.certificates[i][t].certified_accuracy for i in order]
        handles += ax2.plot(x, acc, "s--", color=c, lw=1.4, label=f"certified accuracy, {_label(t)}")
        handles.append(ax2.axhline(spec.tau, color=c, ls=":", lw=1.4, label=f"τ {_label(t)} = {spec.tau:g}"))
    ax2.set_ylabel("certified accuracy")
    all_acc = [c.certified_accuracy for certs in lid.certificates for c in certs.values()] + [s.tau for s in lid.tasks.values()]
    ax2.set_ylim(max(0.0, min(all_acc) - 0.05), 1.005)
    if len(x) <= 12:
        ax.set_xticks(x)
    ax2.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="upper center",
               bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(handles)), frameon=False)
    ax.set_title("Checkpoint curve of the LID: size vs certified accuracy")
    fig.tight_layout()
    return _png(fig)


def _status_key(r: VersionAudit) -> str:
    s = str(r.status).strip().lower()
    if s in ("promoted", "champion"):
        return "promoted"
    if s in ("blocked", "pending"):
        return s
    return "other"


def _label(v) -> str:
    """Text safe for a matplotlib label: no mathtext, bounded length."""
    s = str(v)
    if len(s) > _LABEL_CHARS:
        s = s[: _LABEL_CHARS - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols

"""The audit report: registered model versions and their certificates as one HTML page + JSON.

Pure rendering — records in, files out. Whoever walks the MLflow registry (and re-verifies each
version's certificates) builds one ``VersionAudit`` per version; ``render_audit_report`` writes

``report.html``
    self-contained (no external CSS/JS; plots are base64 PNGs rendered with matplotlib's Agg
    canvas, never pyplot, so no global backend state is touched): header with model name, date and
    engine version; a table of every version (status, champion, re-verified ✓/✗, per task the
    certified accuracy against τ, the Clopper–Pearson lower bound and n, block reasons and
    verification failures); three plots — certified accuracy and lower bound per version for
    every task with τ; the width histograms per parameter tensor of the champion's largest LID
    member; the champion LID's checkpoint curve (width sum and certified accuracy per checkpoint).
``summary.json``
    the same version list, machine-readable, with ``ok`` = every promoted version (status
    ``promoted``/``champion`` or the champion alias) was re-verified with no failing task.

All text from the records is HTML-escaped, and ``$`` is escaped for matplotlib's mathtext.
Both files are written to temporary names and moved into place (``os.replace``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lid_engine import LID, __version__ as ENGINE_VERSION

__all__ = [
    "AUDIT_FORMAT",
    "PROMOTED_STATUSES",
    "TaskAudit",
    "VersionAudit",
    "audit_ok",
    "is_promoted",
    "render_audit_report",
    "summary_dict",
]

AUDIT_FORMAT = "lidgate.audit/1"
#: statuses that count as "promoted" for the summary's ``ok`` flag (besides ``is_champion``)
PROMOTED_STATUSES = frozenset({"promoted", "champion"})
_KNOWN_STATUSES = ("promoted", "champion", "blocked", "pending", "failed", "archived")
MAX_HISTOGRAMS = 16  # parameter tensors shown in the width histogram grid (largest first)
_LABEL_CHARS = 24


# ------------------------------------------------------------------------------ records
@dataclass
class TaskAudit:
    """One task's certificate of one version, as re-verified by the auditor."""

    task: str
    tau: float
    certified_accuracy: float
    lower_bound: float
    n: int
    verified: bool
    failures: list[str] = field(default_factory=list)

    @property
    def meets_tau(self) -> bool:
        return _finite(self.certified_accuracy) and _finite(self.tau) and self.certified_accuracy >= self.tau

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": str(self.task),
            "tau": _num(self.tau),
            "certified_accuracy": _num(self.certified_accuracy),
            "lower_bound": _num(self.lower_bound),
            "n": int(self.n),
            "verified": bool(self.verified),
            "meets_tau": self.meets_tau,
            "failures": [str(f) for f in self.failures],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskAudit:
        nan = float("nan")
        return cls(
            task=d["task"], tau=_denum(d["tau"], nan), certified_accuracy=_denum(d["certified_accuracy"], nan),
            lower_bound=_denum(d["lower_bound"], nan), n=int(d["n"]), verified=bool(d["verified"]),
            failures=list(d.get("failures", [])),
        )


@dataclass
class VersionAudit:
    """One registered model version: its status, whether its certificates re-verified, per-task numbers.

    ``status``: promoted | blocked | pending | champion | … (free text; shown as given).
    ``verified``: every certificate of this version re-verified. ``block_reasons``: ``[{code,
    detail}]``. ``lid``: the version's LID (for the width and checkpoint plots) or None.
    """

    version: str
    status: str
    is_champion: bool
    created: str
    verified: bool
    tasks: list[TaskAudit] = field(default_factory=list)
    block_reasons: list[dict] = field(default_factory=list)
    lid: LID | None = None

    @property
    def promoted(self) -> bool:
        return is_promoted(self)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "version": str(self.version),
            "status": str(self.status),
            "is_champion": bool(self.is_champion),
            "promoted": self.promoted,
            "created": str(self.created),
            "verified": bool(self.verified),
            "tasks": [t.to_dict() for t in self.tasks],
            "block_reasons": [_json_safe(dict(r)) for r in self.block_reasons],
            "lid": _lid_summary(self.lid) if self.lid is not None else None,
        }
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionAudit:
        """A record from ``summary.json`` (without the LID itself: ``lid`` is None)."""
        return cls(
            version=d["version"], status=d["status"], is_champion=bool(d["is_champion"]), created=d["created"],
            verified=bool(d["verified"]), tasks=[TaskAudit.from_dict(t) for t in d.get("tasks", [])],
            block_reasons=[dict(r) for r in d.get("block_reasons", [])], lid=None,
        )


def is_promoted(record: VersionAudit) -> bool:
    return bool(record.is_champion) or str(record.status).strip().lower() in PROMOTED_STATUSES


def _problems(records: Sequence[VersionAudit]) -> list[str]:
    out = []
    for r in records:
        if not is_promoted(r):
            continue
        if not r.verified:
            out.append(f"version {r.version} is {r.status} but its certificates did not re-verify")
        for t in r.tasks:
            if not t.verified:
                out.append(f"version {r.version} is {r.status} but task '{t.task}' did not re-verify")
    return out


def audit_ok(records: Sequence[VersionAudit]) -> bool:
    """Every promoted version re-verified, and none of its tasks failed (vacuously true without any)."""
    return not _problems(records)


def summary_dict(records: Sequence[VersionAudit], *, model_name: str, generated_at: str | None = None) -> dict:
    problems = _problems(records)
    return {
        "format": AUDIT_FORMAT,
        "model_name": str(model_name),
        "generated_at": generated_at or _now(),
        "engine_version": ENGINE_VERSION,
        "ok": not problems,
        "problems": problems,
        "n_versions": len(records),
        "champion": next((str(r.version) for r in records if r.is_champion), None),
        "versions": [r.to_dict() for r in records],
    }


# ------------------------------------------------------------------------------ small helpers
def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> float | None:
    """JSON has no NaN/inf: non-finite or missing numbers become null."""
    return float(v) if _finite(v) else None


def _denum(v, default: float) -> float:
    return float(v) if v is not None else default


def _json_safe(obj):
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _label(v) -> str:
    """Text safe for a matplotlib label: no mathtext, bounded length."""
    s = str(v)
    if len(s) > _LABEL_CHARS:
        s = s[: _LABEL_CHARS - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "–"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _task_names(records: Sequence[VersionAudit]) -> list[str]:
    names: list[str] = []
    for r in records:
        for t in r.tasks:
            if str(t.task) not in names:
                names.append(str(t.task))
    return names


# ------------------------------------------------------------------------------ LID helpers
def _member_iterations(lid: LID) -> tuple[list[float], str]:
    """x positions of the members on the checkpoint curve, and the axis label."""
    cfg = lid.search_config or {}
    its = cfg.get("checkpoint_iterations")
    idx = cfg.get("member_indices")
    m = len(lid.members)
    if isinstance(its, list) and all(_finite(i) for i in its):
        if isinstance(idx, list) and len(idx) == m and all(isinstance(i, int) and 0 <= i < len(its) for i in idx):
            return [float(its[i]) for i in idx], "search iteration of the checkpoint"
        if len(its) == m:
            return [float(i) for i in its], "search iteration of the checkpoint"
    return [float(i) for i in range(m)], "LID member index"


def _lid_summary(lid: LID) -> dict[str, Any]:
    iters, xlabel = _member_iterations(lid)
    sums = lid.width_sum()
    members = []
    for i, certs in enumerate(lid.certificates):
        members.append({
            "index": i,
            "x": iters[i],
            "width_sum": _num(sums[i]),
            "certified_accuracy": {t: _num(c.certified_accuracy) for t, c in certs.items()},
            "lower_bound": {t: _num(c.lower_bound) for t, c in certs.items()},
        })
    return {
        "model_sha256": lid.model_sha256,
        "engine_version": lid.engine_version,
        "n_members": len(lid.members),
        "x_axis": xlabel,
        "largest_member": int(np.argmax(sums)) if sums else None,
        "tasks": {t: {"kind": s.kind, "tau": _num(s.tau)} for t, s in lid.tasks.items()},
        "members": members,
    }


def _largest_member(lid: LID) -> int:
    sums = lid.width_sum()
    return int(max(range(len(sums)), key=lambda i: (sums[i] if _finite(sums[i]) else -math.inf)))


def _focus_record(records: Sequence[VersionAudit]) -> tuple[VersionAudit | None, str]:
    """The record whose LID the width/checkpoint plots show: the champion's, else the newest with one."""
    for r in records:
        if r.is_champion and r.lid is not None:
            return r, "champion"
    for r in reversed(records):
        if r.lid is not None:
            return r, "no champion with an LID; showing the last version that has one"
    return None, ""


# ------------------------------------------------------------------------------ plots
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


_STATUS_COLOURS = {"promoted": "#2e7d32", "champion": "#1565c0", "blocked": "#c62828", "pending": "#9e9e9e"}


def plot_accuracy(records: Sequence[VersionAudit]) -> bytes | None:
    """Certified accuracy (solid) and CP lower bound (dashed) per version, one panel per task, τ line."""
    tasks = _task_names(records)
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
            acc.append(t.certified_accuracy if t is not None and _finite(t.certified_accuracy) else np.nan)
            lb.append(t.lower_bound if t is not None and _finite(t.lower_bound) else np.nan)
            taus.append(t.tau if t is not None and _finite(t.tau) else np.nan)
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
        distinct = sorted({v for v in taus if not np.isnan(v)})
        if len(distinct) == 1:
            ax.axhline(distinct[0], color="#c62828", ls=":", lw=1.6, label=f"τ = {distinct[0]:g}", zorder=1)
        elif distinct:  # τ changed between versions: draw it per version
            ax.step(x, taus, where="mid", color="#c62828", ls=":", lw=1.6, label="τ (per version)", zorder=1)
        values = [v for v in acc + lb + taus if not np.isnan(v)]
        lo = min(values) if values else 0.0
        ax.set_ylim(max(0.0, lo - 0.05), 1.005)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30 if len(records) > 6 else 0, ha="right" if len(records) > 6 else "center")
        ax.set_xlabel("model version")
        ax.set_ylabel("certified accuracy")
        ax.set_title(f"task {_label(task)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle("Certified accuracy per version (solid), Clopper–Pearson lower bound (dashed), τ (dotted)",
                 fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _status_key(r: VersionAudit) -> str:
    s = str(r.status).strip().lower()
    if s in ("promoted", "champion"):
        return "promoted"
    if s in ("blocked", "pending"):
        return s
    return "other"


def plot_width_histograms(lid: LID, member: int) -> tuple[bytes, list[str]]:
    """Histogram of the coordinate widths of one member, one panel per parameter tensor."""
    from matplotlib.ticker import MaxNLocator

    box = lid.members[member]
    widths = {}
    for name in box.names:
        w = box.width(name).detach().to("cpu").double().numpy().ravel()
        widths[name] = w
    names = sorted(widths, key=lambda n: -widths[n].size)
    shown, omitted = names[:MAX_HISTOGRAMS], names[MAX_HISTOGRAMS:]
    shown = [n for n in box.names if n in shown]  # keep the model's layer order
    rows, cols = _grid(len(shown), 3)
    fig = _new_figure(4.4 * cols, 3.0 * rows + 0.6)
    for k, name in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        w = widths[name]
        pos = w[w > 0]
        zeros = int((w <= 0).sum())
        log = pos.size > 0 and pos.max() / pos.min() >= 100.0
        nbins = int(min(40, max(8, math.sqrt(pos.size))))
        if pos.size == 0:
            ax.text(0.5, 0.5, "all widths are 0", ha="center", va="center", transform=ax.transAxes)
        elif log:
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
        title = f"{_label(name)}  ({w.size} coords)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("width (upper − lower)" + (", log scale" if log else ""), fontsize=8)
        ax.set_ylabel("coordinates", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if pos.size:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # headroom for the note
        ax.tick_params(labelsize=7)
        note = f"mean {w.mean():.3g}, max {w.max():.3g}" + (f"\n{zeros} zero-width" if zeros else "")
        ax.text(0.97, 0.95, note, ha="right", va="top", fontsize=7, transform=ax.transAxes,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8, "lw": 0.3})
    fig.suptitle(f"Width per coordinate, LID member {member} (largest width sum)")
    fig.tight_layout()
    return _png(fig), omitted


def plot_checkpoint_curve(lid: LID, highlight: int) -> bytes:
    """Width sum (left axis, log) and certified accuracy per task (right axis, τ dotted) per checkpoint."""
    xs, xlabel = _member_iterations(lid)
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


# ------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#212121}
h1{margin-bottom:4px} .meta{color:#555;margin-bottom:16px}
table{border-collapse:collapse;margin:12px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#2e7d32;font-weight:bold} .bad{color:#c62828;font-weight:bold}
.status{padding:1px 6px;border-radius:4px;font-size:12px;color:white;background:#616161}
.status-promoted,.status-champion{background:#2e7d32} .status-blocked,.status-failed{background:#c62828}
.status-pending{background:#9e9e9e} .status-archived{background:#795548}
.badge{display:inline-block;padding:4px 10px;border-radius:6px;color:white;font-weight:bold}
.badge.ok{background:#2e7d32;color:white} .badge.bad{background:#c62828;color:white}
figure{margin:16px 0} figcaption{color:#555;font-size:13px;max-width:1000px} img{max-width:100%}
ul.reasons{margin:0;padding-left:18px} code{font-size:12px}
"""


def _status_html(status: str) -> str:
    key = str(status).strip().lower()
    cls = f"status status-{key}" if key in _KNOWN_STATUSES else "status"
    return f'<span class="{cls}">{_esc(status)}</span>'


def _check(ok: bool) -> str:
    return '<span class="ok" title="verified">✓</span>' if ok else '<span class="bad" title="not verified">✗</span>'


def _version_table(records: Sequence[VersionAudit], tasks: list[str]) -> str:
    head = ["version", "status", "champion", "verified", "created"]
    cols = "".join(f"<th rowspan=2>{h}</th>" for h in head)
    cols += "".join(f'<th colspan=3>task {_esc(t)}</th>' for t in tasks)
    cols += "<th rowspan=2>block reasons / verification failures</th>"
    sub = "".join("<th>certified acc. vs τ</th><th>lower bound</th><th>n</th>" for _ in tasks)
    rows = []
    for r in records:
        cells = [
            f"<td><code>{_esc(r.version)}</code></td>",
            f"<td>{_status_html(r.status)}</td>",
            f"<td>{'★ champion' if r.is_champion else ''}</td>",
            f"<td>{_check(bool(r.verified))}</td>",
            f"<td>{_esc(r.created)}</td>",
        ]
        for name in tasks:
            t = next((t for t in r.tasks if str(t.task) == name), None)
            if t is None:
                cells.append('<td colspan=3 class="num">–</td>')
                continue
            mark = "ok" if t.meets_tau else "bad"
            cells.append(
                f'<td class="num"><span class="{mark}">{_fmt(t.certified_accuracy)}</span> '
                f'{"≥" if t.meets_tau else "&lt;"} τ {_esc(f"{t.tau:g}" if _finite(t.tau) else "–")} {_check(bool(t.verified))}</td>'
                f'<td class="num">{_fmt(t.lower_bound)}</td><td class="num">{_esc(t.n)}</td>'
            )
        items = []
        for reason in r.block_reasons:
            if isinstance(reason, Mapping):
                code, detail = reason.get("code", ""), reason.get("detail", "")
                extra = {k: v for k, v in reason.items() if k not in ("code", "detail")}
                text = f"<b>{_esc(code)}</b>: {_esc(detail)}" + (f" <code>{_esc(json.dumps(_json_safe(extra)))}</code>"
                                                                 if extra else "")
            else:
                text = _esc(reason)
            items.append(f"<li>{text}</li>")
        for t in r.tasks:
            for f in t.failures:
                items.append(f'<li><b>verify</b> [{_esc(t.task)}]: {_esc(f)}</li>')
        cells.append(f'<td><ul class="reasons">{"".join(items)}</ul></td>' if items else "<td></td>")
        rows.append(f'<tr class="version-row" data-status="{_esc(r.status)}">{"".join(cells)}</tr>')
    if not rows:
        rows.append(f'<tr><td colspan="{len(head) + 3 * len(tasks) + 1}">no model versions</td></tr>')
    return f'<table id="versions"><thead><tr>{cols}</tr><tr>{sub}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _member_table(lid: LID) -> str:
    xs, xlabel = _member_iterations(lid)
    sums = lid.width_sum()
    tasks = list(lid.tasks)
    head = (f"<th>member</th><th>{_esc(xlabel)}</th><th>width sum</th>"
            + "".join(f"<th>certified acc. {_esc(t)}</th><th>lower bound {_esc(t)}</th>" for t in tasks))
    rows = []
    for i, certs in enumerate(lid.certificates):
        x = xs[i]
        xs_text = str(int(x)) if float(x).is_integer() else f"{x:g}"
        rows.append(
            f"<tr><td class=num>{i}</td><td class=num>{_esc(xs_text)}</td><td class=num>{sums[i]:.4g}</td>"
            + "".join(f"<td class=num>{_fmt(certs[t].certified_accuracy)}</td><td class=num>{_fmt(certs[t].lower_bound)}</td>"
                      for t in tasks)
            + "</tr>"
        )
    return f'<table class="members"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def render_audit_report(
    records: Sequence[VersionAudit],
    out_dir: str | Path,
    *,
    model_name: str,
    save_plots: bool = False,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.json`` for ``records`` into ``out_dir``; returns both paths.

    Records are shown in the order given (pass them oldest first). ``save_plots=True`` also writes
    the plots as PNG files beside the report (``plot_accuracy.png``, ``plot_widths.png``,
    ``plot_checkpoints.png``), for viewing them outside the page.
    """
    records = list(records)
    for i, r in enumerate(records):
        if not isinstance(r, VersionAudit):
            raise TypeError(f"render_audit_report: record {i} must be a VersionAudit, got {type(r).__name__}")
        if r.lid is not None and not isinstance(r.lid, LID):
            raise TypeError(f"render_audit_report: record {i} ('{r.version}'): 'lid' must be a lid_engine LID or None")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generated = _now()
    summary = summary_dict(records, model_name=model_name, generated_at=generated)
    tasks = _task_names(records)

    plots: list[tuple[str, str, bytes | None, str]] = []  # (file stem, title, png, caption)
    acc_png = plot_accuracy(records)
    plots.append(("plot_accuracy", "Certified accuracy per version", acc_png,
                  "Per task: certified accuracy on the held-out certification set (solid) and the Clopper–Pearson "
                  "population lower bound (dashed) of every version; τ is the dotted line. Markers: status; ★ the "
                  "champion."))
    focus, why = _focus_record(records)
    lid_html = ""
    if focus is not None:
        lid = focus.lid
        member = _largest_member(lid)
        width_png, omitted = plot_width_histograms(lid, member)
        cap = (f"Version <code>{_esc(focus.version)}</code> ({_esc(why)}): distribution of the box width "
               f"(upper − lower) of every coordinate, per parameter tensor, for member {member} of {len(lid.members)} "
               "(largest width sum). Log-scale x where a tensor's widths span two decades or more.")
        if omitted:
            cap += f" {len(omitted)} smaller tensors not shown: " + ", ".join(f"<code>{_esc(n)}</code>" for n in omitted)
        plots.append(("plot_widths", "Width histograms", width_png, cap))
        plots.append(("plot_checkpoints", "Checkpoint curve", plot_checkpoint_curve(lid, member),
                      f"Version <code>{_esc(focus.version)}</code>: width sum of each LID member (left axis) and its "
                      "certified accuracy per task (right axis; τ dotted) against the search checkpoint it came from "
                      "(member index when the LID records no checkpoint iterations). Larger boxes allow larger "
                      "updates, usually at the price of certified accuracy."))
        lid_html = (f"<h2>LID of version <code>{_esc(focus.version)}</code></h2>"
                    f"<p>model sha256 <code>{_esc(lid.model_sha256)}</code>, {len(lid.members)} member(s), "
                    f"engine {_esc(lid.engine_version)}, created {_esc(lid.created_at)}</p>" + _member_table(lid))
    else:
        plots.append(("plot_widths", "Width histograms", None, "No version carries an LID: nothing to plot."))
        plots.append(("plot_checkpoints", "Checkpoint curve", None, "No version carries an LID: nothing to plot."))

    figures = []
    for stem, title, png, caption in plots:
        if png is None:
            figures.append(f'<figure id="{stem}"><h3>{_esc(title)}</h3><p><em>{caption}</em></p></figure>')
            continue
        if save_plots:
            _atomic_write(out / f"{stem}.png", png)
        figures.append(f'<figure id="{stem}"><h3>{_esc(title)}</h3>{_img(png, title)}<figcaption>{caption}</figcaption></figure>')
    if acc_png is None:
        figures[0] = ('<figure id="plot_accuracy"><h3>Certified accuracy per version</h3>'
                      "<p><em>No version has task certificates: nothing to plot.</em></p></figure>")

    ok = summary["ok"]
    n_promoted = sum(1 for r in records if is_promoted(r))
    badge = ('<span class="badge ok">OK: every promoted version re-verified</span>' if ok else
             '<span class="badge bad">NOT OK: a promoted version failed re-verification</span>')
    problems = "".join(f"<li>{_esc(p)}</li>" for p in summary["problems"])
    champion = summary["champion"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lidgate audit — {_esc(model_name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>lidgate audit report — <code>{_esc(model_name)}</code></h1>
<div class="meta">generated {_esc(generated)} · lid_engine {_esc(ENGINE_VERSION)} · {len(records)} version(s),
{n_promoted} promoted · champion: {f"<code>{_esc(champion)}</code>" if champion is not None else "none"}</div>
<p>{badge}</p>
{f'<ul class="problems">{problems}</ul>' if problems else ''}
<h2>Model versions</h2>
{_version_table(records, tasks)}
<h2>Plots</h2>
{''.join(figures)}
{lid_html}
</body></html>
"""
    html_path, json_path = out / "report.html", out / "summary.json"
    _atomic_write(json_path, (json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    _atomic_write(html_path, page.encode("utf-8"))
    return html_path, json_path

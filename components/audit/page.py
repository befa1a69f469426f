"""The audit report's files: ``report.html`` (one self-contained page) and ``summary.json``.

The page is readable at any window width: the versions table lays each version's certificates
out inside its row (one line per task) instead of three columns per task, so it stays as wide as
the page however many tasks and lineage checks there are; it also sits in a container that scrolls
on its own if a narrow window still cannot hold it, and long reasons wrap. No external CSS/JS; the
plots are base64 PNGs. All text from the records is HTML-escaped. Both files are written atomically.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from lid_engine import LID, __version__ as ENGINE_VERSION
from lid_engine.files import atomic_write, utc_now

from .plots import plot_accuracy, plot_checkpoint_curve, plot_heldout_accuracy, plot_width_histograms
from .records import (
    TaskAudit,
    VersionAudit,
    finite,
    focus_record,
    is_promoted,
    json_safe,
    largest_member,
    member_positions,
    summary_dict,
)

__all__ = ["render_audit_report"]

_KNOWN_STATUSES = ("promoted", "champion", "blocked", "pending", "incomplete", "failed", "archived")
_FAILURES_SHOWN = 4  # per version; the rest behind a <details> toggle

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;padding:0 24px;
     max-width:1400px;color:#212121;line-height:1.35}
h1{margin-bottom:4px;overflow-wrap:anywhere} h2{margin-top:28px} .meta{color:#555;margin-bottom:16px}
.table-wrap{max-width:100%;overflow-x:auto;margin:12px 0}
table{border-collapse:collapse;font-size:14px}
table.versions{width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f0f0f0;white-space:nowrap} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.nowrap{white-space:nowrap} td.created{min-width:6em} td.reasons{min-width:18em;overflow-wrap:anywhere}
.champ{margin-top:4px;white-space:nowrap;color:#8d6e00;font-weight:bold} .meta code{font-size:1em}
.certs{display:grid;grid-template-columns:minmax(15em,max-content) max-content max-content max-content;
       column-gap:14px;row-gap:2px;font-variant-numeric:tabular-nums}
.certs .head{color:#666;font-size:12px;border-bottom:1px solid #ddd}
.certs .task{overflow-wrap:anywhere} .certs .what{color:#555;font-size:90%} .certs .n,.certs .lb{text-align:right}
.ok{color:#2e7d32;font-weight:bold} .bad{color:#c62828;font-weight:bold} .none{color:#888}
.status{padding:1px 6px;border-radius:4px;font-size:12px;color:white;background:#616161;white-space:nowrap}
.status-promoted,.status-champion{background:#2e7d32} .status-blocked,.status-failed{background:#c62828}
.status-pending{background:#9e9e9e} .status-incomplete{background:#ef6c00} .status-archived{background:#795548}
.badge{display:inline-block;padding:4px 10px;border-radius:6px;color:white;font-weight:bold}
.badge.ok{background:#2e7d32;color:white} .badge.bad{background:#c62828;color:white}
figure{margin:16px 0} figcaption,p.note{color:#555;font-size:13px;max-width:1000px} img{max-width:100%;height:auto}
ul.reasons{margin:0;padding-left:18px} ul.reasons li{margin-bottom:3px}
code{font-family:ui-monospace,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:0.9em}
details summary{cursor:pointer;color:#1565c0;font-size:13px}
"""


def render_audit_report(
    records: Sequence[VersionAudit],
    out_dir: str | Path,
    *,
    model_name: str,
    save_plots: bool = False,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.json`` for ``records`` into ``out_dir``.

    Args:
        records: one per version, shown in the order given (pass them oldest first).
        out_dir: created if needed.
        model_name: the registered model's name (page title, summary).
        save_plots: also write the plots as PNG files beside the report (``plot_accuracy.png``,
            ``plot_widths.png``, ``plot_checkpoints.png``), for viewing them outside the page.

    Returns:
        The paths of ``report.html`` and ``summary.json``.

    Raises:
        TypeError: a record is not a ``VersionAudit`` or its ``lid`` is not a ``lid_engine.LID``.
    """
    records = list(records)
    for i, r in enumerate(records):
        if not isinstance(r, VersionAudit):
            raise TypeError(f"render_audit_report: record {i} must be a VersionAudit, got {type(r).__name__}")
        if r.lid is not None and not isinstance(r.lid, LID):
            raise TypeError(f"render_audit_report: record {i} ('{r.version}'): 'lid' must be a lid_engine LID or None")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generated = utc_now()
    summary = summary_dict(records, model_name=model_name, generated_at=generated)

    figures, lid_html = [], ""
    acc_png = plot_accuracy(records)
    figures.append(_figure(out if save_plots else None, "plot_accuracy", "Certified accuracy per version", acc_png,
                           "Per task: certified accuracy on the held-out certification set (solid) and the "
                           "Clopper–Pearson population lower bound (dashed) of every version; τ is the dotted line. "
                           "Markers: status; ★ the champion." if acc_png is not None else
                           "No version has task certificates: nothing to plot."))
    held_png = plot_heldout_accuracy(records)
    if held_png is not None:
        figures.insert(0, _figure(out if save_plots else None, "plot_heldout", "What each version gets right", held_png,
                                  "Plain accuracy of every version's model on the held-out certification data of "
                                  "every task in the registry: what an update learnt (its own task) and what it "
                                  "kept (the tasks of earlier versions). Certificates bound the worst case over a "
                                  "whole domain; these bars are the registered models themselves."))
    focus, why = focus_record(records)
    if focus is not None:
        lid = focus.lid
        member = largest_member(lid)
        widths = plot_width_histograms(lid, member)
        cap = (f"Version <code>{_esc(focus.version)}</code> ({_esc(why)}): distribution of the box width "
               f"(upper − lower) of every coordinate, per parameter tensor, for member {member} of {len(lid.members)} "
               "(largest width sum). Log-scale x where a tensor's widths span two decades or more.")
        if widths.omitted:
            cap += (f" {len(widths.omitted)} smaller tensors not shown: "
                    + ", ".join(f"<code>{_esc(n)}</code>" for n in widths.omitted) + ".")
        if widths.png is None:
            cap += " No tensor has any width in this member: the LID allows no change to any parameter."
        figures.append(_figure(out if save_plots else None, "plot_widths", "Width histograms", widths.png, cap,
                               extra=_zero_widths(widths.zero)))
        figures.append(_figure(
            out if save_plots else None, "plot_checkpoints", "Checkpoint curve", plot_checkpoint_curve(lid, member),
            f"Version <code>{_esc(focus.version)}</code>: width sum of each LID member (left axis) and its "
            "certified accuracy per task (right axis; τ dotted) against the search checkpoint it came from "
            "(member index when the LID records no checkpoint iterations). Larger boxes allow larger "
            "updates, usually at the price of certified accuracy."))
        lid_html = (f"<h2>LID of version <code>{_esc(focus.version)}</code></h2>"
                    f"<p>model sha256 <code>{_esc(lid.model_sha256)}</code>, {len(lid.members)} member(s), "
                    f"engine {_esc(lid.engine_version)}, created {_esc(lid.created_at)}</p>" + _member_table(lid))
    else:
        for stem, title in (("plot_widths", "Width histograms"), ("plot_checkpoints", "Checkpoint curve")):
            figures.append(_figure(None, stem, title, None, "No version carries an LID: nothing to plot."))

    ok = summary["ok"]
    n_promoted = sum(1 for r in records if is_promoted(r))
    badge = ('<span class="badge ok">OK: every promoted version re-verified</span>' if ok else
             '<span class="badge bad">NOT OK: a promoted version failed re-verification</span>')
    problems = "".join(f"<li>{_esc(p)}</li>" for p in summary["problems"])
    champion = summary["champion"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lidgate audit — {_esc(model_name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>lidgate audit report — <code>{_esc(model_name)}</code></h1>
<div class="meta">generated {_esc(generated)} · lid_engine {_esc(ENGINE_VERSION)} · {len(records)} version(s),
{n_promoted} promoted · champion: {f"<code>{_esc(champion)}</code>" if champion is not None else "none"}</div>
<p>{badge}</p>
{f'<ul class="problems">{problems}</ul>' if problems else ''}
<h2>Model versions</h2>
<p class="note">Each version's own certificates were recomputed from its registered LID and certification data;
rows marked <i>LID of v…</i> re-check this version's weights against an earlier champion's certificate
(the member that contains them). ✓ re-verified, ✗ not.</p>
<div class="table-wrap">{_version_table(records)}</div>
{_accuracy_table(records)}
<h2>Plots</h2>
{''.join(figures)}
{lid_html}
</body></html>
"""
    html_path, json_path = out / "report.html", out / "summary.json"
    atomic_write(json_path, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write(html_path, page)
    return html_path, json_path


# ------------------------------------------------------------------------------ pieces
def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if finite(v) else "–"


def _short_time(text: str) -> str:
    """``2026-12-05T07:21:23.456+00:00`` → ``2026-12-05 07:21 UTC`` (the full value stays in the title)."""
    try:
        ts = datetime.fromisoformat(str(text))
    except ValueError:
        return _esc(text)
    zone = " UTC" if ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0 else ""
    return f'<span title="{_esc(text)}">{ts:%Y-%m-%d %H:%M}{zone}</span>'


def _status_html(status: str) -> str:
    key = str(status).strip().lower()
    cls = f"status status-{key}" if key in _KNOWN_STATUSES else "status"
    return f'<span class="{cls}">{_esc(status)}</span>'


def _check(ok: bool) -> str:
    return '<span class="ok" title="verified">✓</span>' if ok else '<span class="bad" title="not verified">✗</span>'


def _certs(tasks: Sequence[TaskAudit]) -> str:
    """One grid line per task: name, certified accuracy vs τ with ✓/✗, lower bound, n."""
    if not tasks:
        return '<span class="none">no certificates</span>'
    cells = ['<span class="head">task</span><span class="head">certified vs τ</span>'
             '<span class="head lb">lower bound</span><span class="head n">n</span>']
    for t in tasks:
        mark = "ok" if t.meets_tau else "bad"
        tau = _esc(f"{t.tau:g}") if finite(t.tau) else "–"
        cells.append(
            f'<span class="task">{_esc(t.task)}'
            + (f'<br><span class="what">{_esc(t.constraint)}</span>' if t.constraint else "") + '</span>'
            f'<span><span class="{mark}">{_fmt(t.certified_accuracy)}</span> {"≥" if t.meets_tau else "&lt;"} '
            f'{tau} {_check(bool(t.verified))}</span>'
            f'<span class="lb">{_fmt(t.lower_bound)}</span><span class="n">{_esc(t.n)}</span>')
    return f'<div class="certs">{"".join(cells)}</div>'


def _reasons(r: VersionAudit) -> str:
    """Block reasons, then verification failures; a failure shared by several tasks is listed once."""
    items = []
    for reason in r.block_reasons:
        if isinstance(reason, Mapping):
            code, detail = reason.get("code", ""), reason.get("detail", "")
            extra = {k: v for k, v in reason.items() if k not in ("code", "detail")}
            text = f"<b>{_esc(code)}</b>: {_esc(detail)}" + (
                f" <code>{_esc(json.dumps(json_safe(extra)))}</code>" if extra else "")
        else:
            text = _esc(reason)
        items.append(f"<li>{text}</li>")
    tasks_of: dict[str, list[str]] = {}
    for t in r.tasks:
        for f in t.failures:
            tasks_of.setdefault(str(f), []).append(str(t.task))
    for f, names in tasks_of.items():
        items.append(f'<li><b>verify</b> [{_esc(", ".join(dict.fromkeys(names)))}]: {_esc(f)}</li>')
    if not items:
        return ""
    shown, rest = items[:_FAILURES_SHOWN], items[_FAILURES_SHOWN:]
    more = (f'<details><summary>{len(rest)} more</summary><ul class="reasons">{"".join(rest)}</ul></details>'
            if rest else "")
    return f'<ul class="reasons">{"".join(shown)}</ul>{more}'


def _version_table(records: Sequence[VersionAudit]) -> str:
    head = ("<th>version</th><th>status</th><th>re-verified</th><th>created</th>"
            "<th>certificates</th><th>block reasons / verification failures</th>")
    rows = []
    for r in records:
        rows.append(
            f'<tr class="version-row" data-status="{_esc(r.status)}">'
            f"<td><code>{_esc(r.version)}</code></td>"
            f'<td class="nowrap">{_status_html(r.status)}'
            f'{"<div class=champ>★ champion</div>" if r.is_champion else ""}</td>'
            f"<td>{_check(bool(r.verified))}</td>"
            f'<td class="created">{_short_time(r.created) if r.created else ""}</td>'
            f"<td>{_certs(r.tasks)}</td>"
            f'<td class="reasons">{_reasons(r)}</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="6">no model versions</td></tr>')
    return f'<table id="versions" class="versions"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _accuracy_table(records: Sequence[VersionAudit]) -> str:
    """Versions × tasks: plain accuracy on each task's held-out data (empty without any)."""
    tasks = sorted({t for r in records for t in r.accuracy})
    if not tasks:
        return ""
    head = "".join(f"<th>{_esc(t)}</th>" for t in tasks)
    rows = "".join(
        f"<tr><td><code>{_esc(r.version)}</code>{' ★' if r.is_champion else ''}</td><td>{_status_html(r.status)}</td>"
        + "".join(f"<td>{_fmt(r.accuracy.get(t, float('nan')), 3)}</td>" for t in tasks) + "</tr>"
        for r in records)
    return ("<h2>Accuracy on each task's held-out data</h2><p class=\"note\">Plain accuracy of each version's model "
            "(not a certificate): what an update gained on its own task and kept on earlier ones.</p>"
            f"<div class=\"table-wrap\"><table><tr><th>version</th><th>status</th>{head}</tr>{rows}</table></div>")


def _member_table(lid: LID) -> str:
    xs, xlabel = member_positions(lid)
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
    return (f'<div class="table-wrap"><table class="members"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _zero_widths(zero: Sequence[tuple[str, int]]) -> str:
    """The tensors with no width at all, in one line (an empty histogram per tensor says nothing more)."""
    if not zero:
        return ""
    names = ", ".join(f"<code>{_esc(n)}</code> ({c})" for n, c in zero)
    return (f'<p class="note zero-widths">Zero width in every coordinate ({len(zero)} tensor(s); the LID allows '
            f"no change to these parameters): {names}.</p>")


def _figure(out: Path | None, stem: str, title: str, png: bytes | None, caption: str, extra: str = "") -> str:
    """A ``<figure>`` with the embedded PNG (also saved as ``out/stem.png`` when ``out`` is given)."""
    if png is None:
        return f'<figure id="{stem}"><h3>{_esc(title)}</h3><p><em>{caption}</em></p>{extra}</figure>'
    if out is not None:
        atomic_write(out / f"{stem}.png", png)
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{stem}"><h3>{_esc(title)}</h3><img alt="{_esc(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption>{extra}</figure>")

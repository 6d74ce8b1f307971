"""`magpie-local report`: one self-contained HTML page (inline SVG plots, no scripts, nothing
fetched) with the runs, the IFD, judge score, neighbour distance, length and tag distributions, and
a browsable sample of pairs.

Every stored text is data: it is HTML-escaped, never trusted as markup.
"""

from __future__ import annotations

import json
import random
from html import escape

import numpy as np

from . import tagging
from ._version import __version__
from .store import Store

WIDTH, BAR_HEIGHT = 640, 22

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #1d2430; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d8dde6; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eef0f4; text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5em; } figure { margin: 0; }
figcaption { font-weight: 600; margin-bottom: 4px; }
details { border: 1px solid #d8dde6; border-radius: 6px; margin: 8px 0; padding: 6px 10px; }
summary { cursor: pointer; } .meta { color: #5b6576; font-size: 13px; }
pre { white-space: pre-wrap; background: #f6f7f9; padding: 8px; border-radius: 4px; margin: 4px 0; }
"""


def bar_chart(title: str, labels: list[str], counts: list[int], color: str = "#3b6fd8") -> str:
    """Horizontal bars, one per label, as inline SVG."""
    top = max(counts, default=0) or 1
    label_width, height = 170, BAR_HEIGHT * max(len(labels), 1) + 8
    bars = []
    for i, (label, n) in enumerate(zip(labels, counts)):
        y, w = 4 + i * BAR_HEIGHT, (WIDTH - label_width - 60) * n / top
        bars.append(f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end" font-size="13">{escape(label)}</text>'
                    f'<rect x="{label_width}" y="{y + 3}" width="{w:.1f}" height="{BAR_HEIGHT - 6}" fill="{color}"/>'
                    f'<text x="{label_width + w + 5:.1f}" y="{y + 15}" font-size="12">{n}</text>')
    return (f'<figure><figcaption>{escape(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{escape(title)}">{"".join(bars)}</svg></figure>')


def histogram(title: str, values: np.ndarray, bins: int = 20, fmt: str = "{:.2f}", color: str = "#2f9e72") -> str:
    """A column histogram with its range on the x axis, as inline SVG."""
    if len(values) == 0:
        return f"<figure><figcaption>{escape(title)}</figcaption><p>no values</p></figure>"
    counts, edges = np.histogram(values, bins=bins)
    top, height, base = counts.max() or 1, 180, 160
    step = (WIDTH - 40) / len(counts)
    cols = [f'<rect x="{20 + i * step:.1f}" y="{base - 140 * c / top:.1f}" width="{step - 2:.1f}" '
            f'height="{140 * c / top:.1f}" fill="{color}"><title>{fmt.format(lo)}–{fmt.format(hi)}: {c}</title></rect>'
            for i, (c, lo, hi) in enumerate(zip(counts, edges, edges[1:]))]
    axis = (f'<line x1="20" y1="{base}" x2="{WIDTH - 20}" y2="{base}" stroke="#888"/>'
            f'<text x="20" y="{base + 16}" font-size="12">{fmt.format(edges[0])}</text>'
            f'<text x="{WIDTH - 20}" y="{base + 16}" font-size="12" text-anchor="end">{fmt.format(edges[-1])}</text>'
            f'<text x="{WIDTH / 2}" y="{base + 16}" font-size="12" text-anchor="middle">n = {len(values)}, '
            f'median {fmt.format(float(np.median(values)))}</text>')
    return (f'<figure><figcaption>{escape(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
            f'aria-label="{escape(title)}">{"".join(cols)}{axis}</svg>'
            "</figure>")


def _runs_table(store: Store) -> str:
    rows = "".join(f"<tr><td>{r['id']}</td><td>{escape(r['kind'])}</td><td>{escape(r['status'])}</td>"
                   f"<td>{r['kept']}</td><td>{r['dropped']}</td><td>{escape(r['model'] or '-')}</td>"
                   f"<td>{escape(r['backend'] or '-')}</td><td>{escape(r['created_at'])}</td></tr>"
                   for r in store.list_runs())
    return ("<table><tr><th>run</th><th>kind</th><th>status</th><th>pairs</th><th>dropped</th><th>model</th>"
            f"<th>backend</th><th>created</th></tr>{rows}</table>")


def _checks_table(store: Store) -> str:
    """The curation checks' counts, and the eval sets `curate --against` checked against."""
    counts = store.check_counts()
    if not counts:
        return "<p>Not curated yet (<code>magpie-local curate</code>).</p>"
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{passed}</td><td>{failed}</td></tr>"
                   for name, (passed, failed) in counts.items())
    table = f"<table><tr><th>check</th><th>passed</th><th>failed</th></tr>{rows}</table>"
    if settings := store.check_settings("contamination"):
        sets = json.loads(settings[0])["against"]
        table += "<p>Eval sets checked for contamination: " + "; ".join(
            f"{escape(e['file'])} (sha256 <code>{escape(e['sha256'])}</code>, {e['prompts']} prompts, "
            f"{e['flagged']} pairs flagged)" for e in sets) + "</p>"
    return table


SHOWN_CHARS = 20_000  # of one text in the sample; the rest is counted, not shown (the page stays small)


def _shown(text: str) -> str:
    more = len(text) - SHOWN_CHARS
    return escape(text[:SHOWN_CHARS]) + (f"\n… ({more} more characters)" if more > 0 else "")


def distribution_plots(store: Store, turns: list[tuple], score_run: int | None, tag_run: int | None,
                       judge_run: int | None, embed_run: int | None) -> list[str]:
    """The report's plots (inline SVG): IFD, judge scores, neighbour distances and repeats, instruction
    and response lengths, tag distributions; `turns` as store.kept_turns() gives them."""
    spacing = {r["turn_id"]: r for r in store.neighbour_rows(embed_run)} if embed_run else {}
    ifd = store.ifd_by_turn(score_run) if score_run else {}
    tags = store.tags_by_turn(tag_run) if tag_run else {}
    rated = store.ratings_by_turn(judge_run) if judge_run else {}
    plots = [histogram(f"IFD (scoring run {score_run})", np.array(list(ifd.values()), dtype=float))] if ifd else []
    if rated:
        plots.append(histogram(f"Judge score, 1-5 (judging run {judge_run})", np.array(list(rated.values())),
                               bins=16, color="#c2410c"))
    if spacing:
        radius = next(iter(spacing.values()))["radius"]
        plots.append(histogram(f"Distance to the nearest neighbour (embedding run {embed_run})",
                               np.array([r["distance"] for r in spacing.values() if r["distance"] is not None],
                                        dtype=float), fmt="{:.3f}", color="#0e7490"))
        repeats = np.array([r["repeats"] for r in spacing.values()])
        plots.append(bar_chart(f"Others within cosine distance {radius:g}", ["0", "1", "2", "3-9", "10+"],
                               [int((repeats == 0).sum()), int((repeats == 1).sum()), int((repeats == 2).sum()),
                                int(((repeats >= 3) & (repeats < 10)).sum()), int((repeats >= 10).sum())]))
    plots += [histogram("Instruction length (characters)", np.array([len(t[1]) for t in turns], dtype=float),
                        fmt="{:.0f}", color="#8a63d2"),
              histogram("Response length (characters)", np.array([len(t[2]) for t in turns], dtype=float),
                        fmt="{:.0f}", color="#d2803b")]
    for column, values in tagging.FIELDS.items():
        if tags:
            index = list(tagging.FIELDS).index(column)
            plots.append(bar_chart(f"{column.replace('_', ' ')} (tagging run {tag_run})", list(values),
                                   [sum(1 for t in tags.values() if t[index] == v) for v in values]))
    return plots


def build_report(store: Store, score_run: int | None, tag_run: int | None, sample: int = 50, seed: int = 0,
                 judge_run: int | None = None, embed_run: int | None = None) -> str:
    turns = store.kept_turns()
    plots = distribution_plots(store, turns, score_run, tag_run, judge_run, embed_run)
    spacing = {r["turn_id"]: r for r in store.neighbour_rows(embed_run)} if embed_run else {}
    ifd = store.ifd_by_turn(score_run) if score_run else {}
    tags = store.tags_by_turn(tag_run) if tag_run else {}
    rated = store.ratings_by_turn(judge_run) if judge_run else {}
    chosen = sorted(random.Random(seed).sample(range(len(turns)), min(sample, len(turns))))
    pairs = []
    for i in chosen:
        turn_id, instruction, response, finish, run_id, item = turns[i]
        meta = [f"run {run_id} · item {item}"]
        if turn_id in ifd:
            meta.append(f"IFD {ifd[turn_id]:.3f}")
        if turn_id in rated:
            meta.append(f"judge {rated[turn_id]:.2f}")
        if turn_id in tags:
            meta.append(" · ".join(tags[turn_id]))
        if turn_id in spacing and spacing[turn_id]["distance"] is not None:
            meta.append(f"nearest {spacing[turn_id]['distance']:.3f} away, {spacing[turn_id]['repeats']} within "
                        f"{spacing[turn_id]['radius']:g}")
        if finish == "length":
            meta.append("response cut off")
        title = instruction if len(instruction) <= 140 else instruction[:140].rsplit(" ", 1)[0] + " …"
        pairs.append(f"<details><summary>{escape(title)}<div class=\"meta\">{escape(' · '.join(meta))}"
                     f"</div></summary><b>User</b><pre>{_shown(instruction)}</pre><b>Assistant</b>"
                     f"<pre>{_shown(response)}</pre></details>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>magpie-local report</title>"
            f"<style>{STYLE}</style></head><body><h1>magpie-local report</h1>"
            f"<p class=\"meta\">{escape(str(store.path))} · {len(turns)} kept turns · magpie-local {__version__}</p>"
            f"<h2>Runs</h2>{_runs_table(store)}<h2>Curation checks</h2>{_checks_table(store)}"
            f"<h2>Distributions</h2><div class=\"plots\">{''.join(plots)}</div>"
            f"<h2>Sample of {len(chosen)} pairs</h2>{''.join(pairs)}</body></html>")

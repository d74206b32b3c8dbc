"""The report: ``report.md`` (figures linked), ``report.html`` (self-contained)
and ``claims.json``, from the experiments' sections."""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

from ..atomic import write_text
from .experiment import Section
from .runner import fmt_time
from .verdicts import FAILS, HOLDS, UNSURE, Claim, fmt

CLAIM_HEAD = ["claim", "source", "paper / measured", "measured", "verdict", "seeds", "rule"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top}th{background:#f3f3f3}td.ok{background:#dff5df}td.bad{background:#fadada}
td.unsure{background:#fff3cd}img{max-width:100%}figcaption{font-size:.9em;color:#555}code{background:#f3f3f3}
.warn{border:2px solid #c90;background:#fff3cd;padding:.6em 1em}"""


def cell(v: Any) -> str:
    """A table cell: numbers formatted, missing values '-', never 'None'."""
    return fmt(v) if not isinstance(v, str) else v


def _claim_row(c: Claim) -> List[str]:
    return [c.claim, c.source, c.paper or "-", c.measured, c.verdict, c.agreement or "-", c.rule]


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _verdict_class(c) -> str:
    return {HOLDS: "ok", FAILS: "bad", UNSURE: "unsure"}.get(c, "") if isinstance(c, str) else ""


def html_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td class='{_verdict_class(c)}'>{html.escape(cell(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def per_seed_rows(claims: Sequence[Claim]) -> List[List[Any]]:
    return [[c.claim[:70] + ("..." if len(c.claim) > 70 else ""), seed, v, m]
            for c in claims for seed, v, m in c.per_seed]


def write_report(out: str, sections: Sequence[Section], meta: Dict[str, Any]) -> Tuple[str, str]:
    """Write ``report.md``, ``report.html`` and ``claims.json``; return the first two paths."""
    claims = [c for s in sections for c in s.claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, FAILS, UNSURE)}
    claim_rows = [_claim_row(c) for c in claims]
    warning = meta.get("warning")
    rejected = f", {meta['rejected']} stored records rejected and rerun" if meta.get("rejected") else ""
    intro = (f"Preset `{meta['preset']}` ({meta['preset_text']}), data {meta['data']}, seeds from {meta['seed']}. "
             f"Wall time {fmt_time(meta['wall'])}; CPU time {fmt_time(meta['cpu'])} "
             f"(worker processes {fmt_time(meta['cpu_runs'])} for the runs executed now, the main process "
             f"{fmt_time(meta['cpu_main'])}; the stored runs took {fmt_time(meta['cpu_all_runs'])} of CPU time "
             f"when they were run). {meta['executed']} runs executed, {meta['reused']} reused from an earlier "
             f"invocation{rejected}. "
             f"Claims: {counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[UNSURE]} inconclusive.")
    method = ("Every verdict is computed from this study's measurements by the rule in its row; nothing is written "
              "in by hand. Each experiment runs every configuration with several seeds: 'seeds' says how many "
              "seeds' own verdicts agree (each seed's measurement is listed in its section). Accuracy margins are "
              "95% intervals of a paired bootstrap over seeds and test images (every run is scored on the same "
              f"{meta['test_images']} test images; {meta['bootstrap']} resamples). A tie is not a win.")
    size_rows = [[k, _size_value(v)] for k, v in meta["size"].items()]

    md = ["# normfree study report", ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>normfree study report</title>"
         f"<style>{_CSS}</style></head><body><h1>normfree study report</h1>"]
    if warning:
        md += [f"> **{warning}**", ""]
        h.append(f"<p class='warn'><strong>{html.escape(warning)}</strong></p>")
    md += [intro, "", method, "", "## Claims", "", md_table(CLAIM_HEAD, claim_rows), "",
           "## Configuration and machine", "", md_table(["", ""], meta["machine"]), "",
           md_table(["size", "value"], size_rows), ""]
    h += [f"<p>{html.escape(intro)}</p><p>{html.escape(method)}</p>", "<h2>Claims</h2>",
          html_table(CLAIM_HEAD, claim_rows), "<h2>Configuration and machine</h2>",
          html_table(["", ""], meta["machine"]), html_table(["size", "value"], size_rows)]
    for s in sections:
        timing = (f"{s.runs} runs; CPU time {fmt_time(s.cpu_seconds)} (its runs, when they ran, and the report); "
                  f"judged and drawn in {fmt_time(s.seconds)}")
        md += [f"## {s.title}", "", f"_{timing}_", ""]
        h += [f"<h2>{html.escape(s.title)}</h2><p><em>{timing}</em></p>"]
        for t in s.text:
            md += [t, ""]
            h.append(f"<p>{html.escape(t)}</p>")
        for png, caption in s.figures:
            rel = os.path.relpath(png, out)
            md += [f"![{caption}]({rel})", "", f"*{caption}* ([svg]({os.path.splitext(rel)[0]}.svg))", ""]
            with open(png, "rb") as f:
                b64 = base64.b64encode(f.read()).decode()
            h.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for caption, head, rows in s.tables:
            md += [f"**{caption}**", "", md_table(head, rows), ""]
            h += [f"<p><strong>{html.escape(caption)}</strong></p>", html_table(head, rows)]
        if s.claims:
            rows = [_claim_row(c) for c in s.claims]
            md += ["**Claims**", "", md_table(CLAIM_HEAD, rows), ""]
            h += ["<p><strong>Claims</strong></p>", html_table(CLAIM_HEAD, rows)]
            seed_rows = per_seed_rows(s.claims)
            if seed_rows:
                head = ["claim", "seed", "verdict of this seed alone", "measured"]
                md += ["**Each seed's measurement**", "", md_table(head, seed_rows), ""]
                h += ["<p><strong>Each seed's measurement</strong></p>", html_table(head, seed_rows)]
    h.append("</body></html>")
    md_path, html_path = os.path.join(out, "report.md"), os.path.join(out, "report.html")
    write_text(md_path, "\n".join(md) + "\n")
    write_text(html_path, "\n".join(h))
    write_text(os.path.join(out, "claims.json"),
               json.dumps([claim_dict(c) for c in claims], indent=1) + "\n")
    return md_path, html_path


def claim_dict(c: Claim) -> Dict[str, Any]:
    d = dataclasses.asdict(c)
    d["per_seed"] = [{"seed": s, "verdict": v, "measured": m} for s, v, m in c.per_seed]
    d["agreement"] = c.agreement
    return d


def _size_value(v) -> str:
    if v is None:
        return "none (all)"
    if isinstance(v, tuple):
        return ", ".join(fmt(x) for x in v)
    return fmt(v)

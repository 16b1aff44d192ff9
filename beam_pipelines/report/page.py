"""report.html: the page (page_template.html, a string.Template) filled from a release's statistics:
tables from beam_pipelines.report.numbers, the plots by file name, every text escaped. The page loads
nothing from elsewhere and runs one script, the browse filter, allowed by its hash in the CSP."""
from __future__ import annotations

import base64
import hashlib
import html
import re
from importlib import resources
from string import Template

import storage
from beam_pipelines.assemble.decontaminate import MIN_PROMPT_WORDS
from beam_pipelines.report.changes import pct
from beam_pipelines.report.numbers import decontamination_rows, diversity_rows, funnel_rows, paper_rows, \
    score_bars, stage_rows
from beam_pipelines.report.numbers import pct as _pct
from beam_pipelines.report.paper import PAPER
from beam_pipelines.report.plots import plots
from schemas.layout import CARD, CHANGES, MANIFEST, PLOTS, STATS, ReleaseLayout
from schemas.release_stats import ReleaseStats

TEMPLATE = "page_template.html"


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def by_count(d: dict) -> str:
    """Counts by key, the most first: "a: 1,200, b: 3"; "-" for none."""
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def _link(url: str | None) -> str:
    """A document's URL: a link only when it is http(s); any other scheme (`javascript:`, `data:`,
    `file:`) from a web crawl's metadata is shown as text, never made clickable."""
    if not url:
        return "-"
    if not _WEB_URL.match(url):
        return f"<span class=note>{html.escape(url[:500])}</span>"
    return f'<a href="{html.escape(url, quote=True)}" rel="noopener noreferrer nofollow">{html.escape(url[:500])}</a>'


_WEB_URL = re.compile(r"https?://[^\s\x00-\x1f]+\Z", re.IGNORECASE)

# The browse section's filter: the report's one script, static (the rows it filters are in the table,
# escaped), allowed by its sha256 in the page's CSP and nothing else. `bftMatches` is pure (every word
# of the query, in any case, is in the row's text), so it runs under node too (tests/test_report.py).
# A link can carry a filter: report.html#q=words.
BROWSE_SCRIPT = """
function bftMatches(text, query) {
  var words = query.toLowerCase().split(/\\s+/).filter(function (w) { return w.length > 0; });
  var lower = text.toLowerCase();
  return words.every(function (w) { return lower.indexOf(w) >= 0; });
}
if (typeof document !== "undefined") {
  var box = document.getElementById("q");
  var rows = document.querySelectorAll("#sample tr.row");
  var shown = document.getElementById("shown");
  var bftFilter = function () {
    var n = 0;
    rows.forEach(function (r) { r.hidden = !bftMatches(r.textContent, box.value); if (!r.hidden) { n++; } });
    shown.textContent = n + " of " + rows.length + " shown";
  };
  var asked = /^#q=(.*)$/.exec(location.hash);
  if (asked) { box.value = decodeURIComponent(asked[1]); }
  box.addEventListener("input", bftFilter);
  bftFilter();
}
"""
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(BROWSE_SCRIPT.encode()).digest()).decode()

# The report loads nothing from elsewhere and runs no script but the one above, and says so to the
# browser: even a text that slipped past escaping could not run a script or fetch a resource.
CSP = (f"default-src 'none'; script-src '{SCRIPT_HASH}'; img-src 'self'; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def _changes_html(stats: ReleaseStats) -> str:
    """The alerts and what changed since the parent release (beam_pipelines/report/changes.py), at the head."""
    out = []
    alerts = stats.alerts
    if alerts:
        out.append("<h2 class=warn>Alerts</h2><ul class=warn>" + "".join(f"<li>{html.escape(a)}</li>" for a in alerts)
                   + "</ul>")
    diff = stats.changes or {}
    if not diff.get("parent"):
        out.append("<p class=note>No parent release (the first release of this root).</p>")
    elif diff.get("error"):
        out.append(f"<p class=note>Parent {html.escape(diff['parent'])}: {html.escape(diff['error'])}</p>")
    else:
        rows = [[o, v["added"], v["removed"], v["kept"]] for o, v in diff["examples"].items()]
        shares = [["kept share (web examples / candidates)", pct(diff["kept_share"]["parent"]),
                   pct(diff["kept_share"]["now"])],
                  ["transient failures and refusals / requests", pct(diff["error_share"]["parent"]),
                   pct(diff["error_share"]["now"])]]
        shares += [[f"{s}: rows parsed / all its rows", pct(r["parent"]), pct(r["now"])]
                   for s, r in diff["pass_rates"].items()]
        for origin, fields in (diff.get("lengths") or {}).items():
            shares += [[f"{origin} {f} length (mean tokens)", _fmt(v["parent"]), _fmt(v["now"])] for f, v in fields.items()]
        sc = diff.get("scores") or {}
        if sc.get("parent") or sc.get("now"):
            p, n = sc.get("parent") or {}, sc.get("now") or {}
            shares += [[f"{(n or p).get('stage')} stage: mean score", _fmt(p.get("mean")), _fmt(n.get("mean"))],
                       [f"{(n or p).get('stage')} stage: share of scores >= 5", pct(p.get("share_5")),
                        pct(n.get("share_5"))]]
        domains = [[d, v["added"], v["removed"]] for d, v in (diff.get("by_domain") or {}).items()]
        out.append(f"<h2>What changed since {html.escape(diff['parent'])}</h2>"
                   + _table(["origin", "examples added", "removed", "kept"], rows)
                   + (f"<p class=note>Which ones, and why removed: <code>{CHANGES}/added.parquet</code>, "
                      f"<code>{CHANGES}/removed.parquet</code>; web examples by domain (the most changed):</p>"
                      + _table(["web domain", "added", "removed"], domains) if domains else "")
                   + _table(["measure", html.escape(diff["parent"]), "now"], shares))
    return "\n".join(out)


def _decontamination_html(stats: ReleaseStats) -> str:
    d = stats.decontamination or {}
    sets, pairs = decontamination_rows(stats)
    if not sets:
        return ("<h2>Decontamination</h2><p>None: no evaluation prompts were given (<code>--decontaminate</code>), "
                "so this release was not checked against any benchmark.</p>")
    n = d.get("ngram")
    return (f"<h2>Decontamination</h2><p class=note>A pair whose instruction or response shares a {n}-word "
            f"n-gram (lower case, punctuation ignored) with an evaluation prompt is dropped as "
            f"<code>contaminated:&lt;set&gt;</code>; a prompt shorter than {n} words counts as one n-gram, its "
            f"whole word sequence; a prompt of fewer than {MIN_PROMPT_WORDS} words is ignored (it would drop "
            f"nearly every pair). {len(pairs):,} pair(s) dropped.</p>"
            + _table(["set", "file", "sha256", "prompts", f"{n}-grams", f"prompts under {n} words",
                      f"prompts ignored (under {MIN_PROMPT_WORDS} words)", "pairs dropped"], sets)
            + (_table(["id", "set", "field", "shared n-gram", "evaluation prompt"], pairs) if pairs else ""))


def _browse_html(stats: ReleaseStats) -> str:
    """The browsable sample (corpus_stats.browse_sample) with its filter box; BROWSE_SCRIPT filters it."""
    browse = stats.browse or {"rows": [], "strata": {}}
    rows = "".join(f"<tr class=row><td>{_fmt(e['id'])}</td><td>{_fmt(e['stratum'])}</td><td>{_fmt(e['split'])}</td>"
                   f"<td>{_fmt(e['score'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                   f"<td class=t>{_fmt(e['response'])}</td><td>{_link(e['url'])}</td></tr>"
                   for e in browse["rows"])
    strata = ", ".join(f"{html.escape(s)}: {n:,}" for s, n in browse["strata"].items()) or "none"
    return (f"<h2>Browse a sample</h2><p class=note>{len(browse['rows']):,} examples drawn by sample key, an equal "
            f"share from each stratum (origin and score bucket, the score's integer part) as far as it has "
            f"examples; examples per stratum in the release: {strata}. Every word typed must appear in a row "
            f"(its id, stratum, instruction, response or url); a link can carry a filter: "
            f"<code>report.html#q=words</code>.</p>"
            f'<p><input id=q type=search placeholder="filter the sample" aria-label="filter the sample"> '
            f"<span id=shown>{len(browse['rows']):,} of {len(browse['rows']):,} shown</span></p>"
            f"<table class=ex id=sample><tr><th>id</th><th>stratum</th><th>split</th><th>score</th>"
            f"<th>instruction</th><th>response</th><th>source</th></tr>{rows}</table>")


def _examples_html(stats: ReleaseStats) -> str:
    ex = stats.examples or {"kept": [], "dropped": {}}
    kept = "".join(f"<tr><td>{_fmt(e['id'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                   f"<td class=t>{_fmt(e.get('source'))}</td>"
                   f"<td class=t>{_fmt(e['response'])}</td><td>{_fmt(e['score'])}</td><td>{_link(e['url'])}</td></tr>"
                   for e in ex["kept"])
    # a dropped row shows what the failing stage's model wrote when it has no usable response
    dropped = "".join(f"<tr><td>{_fmt(reason)}</td><td>{_fmt(e['id'])}</td><td class=t>{_fmt(e['instruction'])}</td>"
                      f"<td class=t>{_fmt(e['response'] if e.get('response') is not None else e.get('raw_output'))}</td>"
                      f"<td>{_fmt(e['detail'])}</td><td>{_link(e['url'])}</td></tr>"
                      for reason, rows in sorted(ex["dropped"].items()) for e in rows)
    return (f"<h3>Kept pairs (the smallest ids kept by the recipe and curation)</h3>"
            f"<table class=ex><tr><th>id</th><th>instruction</th><th>source document (excerpt)</th>"
            f"<th>response</th><th>score</th><th>source</th></tr>"
            f"{kept or '<tr><td colspan=6>none</td></tr>'}</table>"
            f"<h3>Dropped rows, one per reason (the smallest id)</h3>"
            f"<table class=ex><tr><th>reason</th><th>id</th><th>instruction</th>"
            f"<th>response, or what the failing stage's model wrote</th>"
            f"<th>stage error</th><th>source</th></tr>{dropped or '<tr><td colspan=6>none</td></tr>'}</table>")


def write_report(folder: str, stats) -> list[str]:
    """report.html and plots/*.png in the release folder; returns the paths written."""
    files = ReleaseLayout(folder)
    written = []
    for name, data in plots(stats).items():
        storage.write_bytes(files.plot(name), data)
        written.append(files.plot(name))
    storage.write_text(files.report, report_html(stats))
    return written + [files.report]


def _img(name: str) -> str:
    return f'<img src="{PLOTS}/{name}.png" alt="{name}">'


def report_html(stats) -> str:
    stats = ReleaseStats.of(stats)
    f = stats.funnel
    tokenizer = html.escape(str(stats.config.get("tokenizer") or "prepare's"))
    compared = paper_rows(stats)
    paper = (_table(["measure", "this release", "the paper", "where"], compared) if compared
             else "<p>Nothing this recipe measures is in the paper.</p>")
    funnel = [[s["step"], s["rows"], s["dropped"] or None, _pct(s["pct_input"]), _pct(s["pct_candidates"]),
               by_count(s["reasons"]) if s["reasons"] else "-"] for s in funnel_rows(stats)]
    stages_of_run = stage_rows(stats)  # once: it may read each model's bft_train.json
    stages = [[r["stage"], r["model"] or "-", r["rows"], r["sent"], by_count(r["not_sent"]), by_count(r["sent_failures"]),
               r["pass_rate_of_sent"], r["input_truncated"], by_count(r["finish_reasons"]), r["prompt_tokens"],
               r["output_tokens"]] for r in stages_of_run]
    size = stats.trigram_sample_size
    diversity = [[r["origin"], r["examples"], r["avg_tokens_instruction"], r["avg_tokens_response"],
                  r["trigrams_instruction"], r["trigrams_response"],
                  f"{r['sample']:,}" + ("" if r["sample_complete"] else f" (fewer than {size:,}: not comparable)")]
                 for r in diversity_rows(stats)]
    score_rows = []
    for stage, d in sorted(stats.score_distributions.items()):
        labels, kept, dropped = score_bars(d)
        score_rows += [[stage, label, k, dr] for label, k, dr in zip(labels, kept, dropped) if k or dr]
    config_rows = [[k, "-" if v is None else str(v)] for k, v in sorted(stats.config.items())]
    models = [[r["stage"], r["model"] or "-"] for r in stages_of_run]
    partial = ""
    if stats.missing_shards:
        partial = (f"<p class=warn>Partial release (--allow-partial): candidate shards "
                   f"{stats.missing_shards} had no complete generation output and are not in it.</p>")
    page = Template(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))
    return page.substitute(
        csp=CSP, version=html.escape(stats.version), recipe=html.escape(stats.recipe), total=f"{f.total:,}",
        train=f"{f.train:,}", validation=f"{f.validation:,}", card=CARD, manifest=MANIFEST, stats_file=STATS,
        partial=partial, changes=_changes_html(stats), trend=_img("trend") if len(stats.trend or []) >= 2 else "",
        code_revision=_fmt(stats.code_revision), finished_at=_fmt(stats.finished_at),
        models=_table(["stage", "model"], models), config=_table(["option", "value"], config_rows),
        funnel=_table(["step", "rows left", "dropped here", "% of Dolma records", "% of candidates", "reasons"], funnel),
        stages=_table(["stage", "model", "rows", "requests sent", "not sent (why)", "parse failures of sent rows",
                       "pass rate of sent", "input truncated", "finish reasons", "prompt tokens", "output tokens"],
                      stages),
        scores=(_table(["stage", "score", "kept", "dropped"], score_rows) if score_rows
                else "<p>No scoring stage in this recipe.</p>"),
        size=f"{size:,}", paper_url=PAPER, tokenizer=tokenizer, paper=paper,
        diversity=_table(["origin", "examples", "avg instruction tokens", "avg response tokens",
                          f"unique instruction trigrams per {size:,}", f"unique response trigrams per {size:,}",
                          "sample"], diversity),
        plot_funnel=_img("funnel"), plot_scores=_img("scores"), plot_lengths=_img("lengths"),
        plot_trigrams=_img("trigrams"), decontamination=_decontamination_html(stats), examples=_examples_html(stats),
        browse=_browse_html(stats), script=BROWSE_SCRIPT)

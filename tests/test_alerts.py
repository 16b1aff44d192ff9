"""Alerts that stop a bad night: a release with no web example, or whose gate passed
nothing, is published but LATEST stays where it was and the verb exits 1 (unless --allow-empty);
--fail-on-alert holds it on any alert; the warnings (one-valued scores, a low digit mass in logprob
mode, a kept share far from the parent's) are lines in the report and the night's summary."""
import json
import os

from beam_pipelines.report import changes
from bft.night import night_text
from generation import parsing
from schemas import outcomes
from tests.helpers.cli import run as bft


def latest(root):
    return open(os.path.join(root, "sft", "LATEST")).read().strip()


def test_a_release_without_web_examples_does_not_move_latest_and_exits_1(published, capsys):
    """Before, a release whose gate passed nothing (8 seed examples, 0 web) was published at exit 0
    and LATEST moved to it."""
    rc, out, err = bft(capsys, "assemble", "--root", published, "--min-score", "6", "--version", "v2", "--quiet")
    assert rc == 1 and latest(published) == "v1", err
    assert "published, but LATEST not moved to it: ALERT no web example: 12 candidates gave none" in err
    assert "ALERT score gate passed nothing: 0 of" in err and "--allow-empty" in err
    stats = json.load(open(os.path.join(published, "sft", "v2", "stats.json")))
    assert changes.critical(stats) == stats["alerts"][:2] and os.path.exists(os.path.join(published, "sft", "v2",
                                                                                          "_SUCCESS"))
    changes_of_a_held_release_can_be_opened_and_diffed(published, stats, capsys)
    # the same release, asked for again: still held; with --allow-empty (not in the config hash) it moves LATEST
    assert bft(capsys, "assemble", "--root", published, "--min-score", "6", "--version", "v2", "--quiet")[0] == 1
    rc, _, err = bft(capsys, "assemble", "--root", published, "--min-score", "6", "--version", "v2", "--quiet",
                     "--allow-empty")
    assert rc == 0 and latest(published) == "v2", err


def stats_of(**changes_):
    stats = {"funnel": {"candidates": 100, "web_examples": 40, "final": {"train": 40, "validation": 0, "total": 40}},
             "gate": {"stage": "score", "threshold": 4.5, "scored": 100, "passed": 40, "pass_rate": 0.4,
                      "digit_mass_mean": None},
             "score_distributions": {"score": {"kept": [0] * 56, "dropped": [0] * 56,
                                               "edges": [i / 10 for i in range(1, 56)]}}}
    stats["score_distributions"]["score"]["kept"][46] = 40    # [4.6, 4.7)
    stats["score_distributions"]["score"]["dropped"][31] = 60  # [3.1, 3.2)
    for key, value in changes_.items():
        section, _, name = key.partition("__")
        stats[section][name] = value
    return stats


def test_each_alert_fires_on_its_figure_and_only_then():
    assert changes.alerts(stats_of(), {}, 0) == []
    assert changes.critical(stats_of(funnel__web_examples=0)) == [
        "no web example: 100 candidates gave none (the release holds 40 seed example(s) only)"]
    assert changes.critical(stats_of(gate__passed=0)) == ["score gate passed nothing: 0 of 100 scored pairs at or "
                                                          "over 4.5"]
    one = stats_of()
    one["score_distributions"]["score"]["kept"][46] = 0
    one["score_distributions"]["score"]["dropped"][31] = 100
    assert changes.alerts(one, {}, 0) == ["score scores: all 100 in one bin [3.1, 3.2) (a scorer that answers one "
                                          "value)"]
    low = changes.alerts(stats_of(gate__digit_mass_mean=0.01), {}, 0)
    assert len(low) == 1 and low[0].startswith("score (logprob mode): the digits 1-5 had 1.0% of the next token's")
    assert changes.alerts(stats_of(gate__digit_mass_mean=0.9), {}, 0) == []
    diff = {"parent": "v0", "kept_share": {"parent": 0.40, "now": 0.15}}
    assert changes.alerts(stats_of(), diff, 0) == ["kept share 40.0% -> 15.0% of the candidates since the parent v0 "
                                                   "(over 2 times either way)"]
    assert changes.alerts(stats_of(), {"parent": "v0", "kept_share": {"parent": 0.40, "now": 0.25}}, 0) == []


def test_the_digit_mass_is_read_back_from_a_logprob_scores_reasoning():
    fields, _ = parsing.score_from_probs({"3": 0.009, "5": 0.001})
    assert outcomes.digit_mass(fields["reasoning"]) == 0.01
    assert outcomes.digit_mass("Score: 5 because it answers") is None and outcomes.digit_mass(None) is None


def test_a_held_nights_summary_carries_its_alert_lines():
    night = {"invocations": [{"started_at": "t", "status": "failed: x"}], "started_at": "t", "stages": {}}
    text = night_text({"outcome": "failed", "exit_code": 1, "error": "held", "night": night,
                       "alerts": ["no web example: 12 candidates gave none"]})
    assert text.splitlines()[-2:] == ["   FAILED (exit 1): held", "   ALERT: no web example: 12 candidates gave none"]



def changes_of_a_held_release_can_be_opened_and_diffed(published, stats, capsys):
    """The report's "What changed" once gave counts only. A release built on a parent holds
    changes/added.parquet and changes/removed.parquet (id, origin, url, domain; removed: why), the report
    counts them by web domain, and `bft diff A B` compares any two releases (here v2 removed every web
    example of v1: the gate passed nothing)."""
    import pandas as pd

    v2 = os.path.join(published, "sft", "v2")
    added = pd.read_parquet(os.path.join(v2, "changes", "added.parquet"))
    removed = pd.read_parquet(os.path.join(v2, "changes", "removed.parquet"))
    web = stats["changes"]["examples"]["web"]
    assert (len(added), len(removed), web["kept"]) == (0, web["removed"], 0) and web["removed"] == 4
    assert list(removed.columns) == ["id", "origin", "url", "domain", "reason"]
    assert set(removed["reason"]) == {"score_below_threshold"} and set(removed["domain"]) == {"example.org"}
    assert (removed["url"] == "https://example.org/" + removed["id"]).all()
    assert stats["changes"]["by_domain"] == {"example.org": {"added": 0, "removed": 4}}
    assert "<td>example.org</td>" in open(os.path.join(v2, "report.html")).read()
    rc, out, err = bft(capsys, "diff", "v1", "v2", "--root", published, "--ids")
    lines = out.splitlines()
    assert rc == 0 and "web: +0 -4 =0" in lines[0], err
    assert lines[1:] == [f"- {i} web score_below_threshold" for i in sorted(removed["id"])]
    rc, out, _ = bft(capsys, "diff", v2, os.path.join(published, "sft", "v1"), "--ids")
    assert rc == 0 and sorted(out.splitlines()[1:]) == sorted(f"+ {i} web" for i in removed["id"])
    rc, out, _ = bft(capsys, "diff", os.path.join(published, "sft", "v1"), v2, "--ids")
    assert rc == 0 and "- " in out
    rc, _, err = bft(capsys, "diff", "v1", "v9", "--root", published)
    assert rc == 1 and "v9" in err and len(err.strip().splitlines()) == 1

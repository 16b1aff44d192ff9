"""bft plan's cost of hosted stages: requests and tokens at the run file's prices
per 1M tokens, online and through the Batch API; GPU-hours for the self-hosted stages only. And the
document tokens it prices where prepare kept documents uncounted."""
import json
import os

import pytest

from tests.helpers.cli import run as bft
from tests.helpers.corpora import ten_documents
from tests.helpers.rebuild import run_file


@pytest.fixture
def corpus(tmp_path, fixture_texts):
    return ten_documents(tmp_path, fixture_texts)


def test_plan_prices_hosted_stages_online_and_batch(tmp_path, tiny_models, bpe_tokenizer_path, corpus, capsys):
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   generate__backtranslate__tokens_per_s=50.0, generate__score__price_in=2.5,
                   generate__score__price_out=10.0)
    rc, out, err = bft(capsys, "plan", "--config", cfg, "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    bt, score = plan["stages"]["backtranslate"], plan["stages"]["score"]
    assert not bt["hosted"] and bt["gpu_hours"] == round(60 / 50 / 3600, 3) and "cost_online" not in bt
    online = (score["prompt_tokens"] * 2.5 + score["output_tokens"] * 10.0) / 1e6
    assert score["hosted"] and score["gpu_hours"] is None and score["batch_discount"] == 0.5
    assert score["cost_online"] == round(online, 2) and score["cost_batch"] == round(online / 2, 2)
    assert plan["gpu_hours_total"] == bt["gpu_hours"]           # the hosted stage needs no GPU of ours
    assert plan["cost_online_total"] == score["cost_online"] and plan["cost_batch_total"] == score["cost_batch"]
    rc, out, err = bft(capsys, "plan", "--config", cfg)
    assert rc == 0 and "cost of the hosted stages" in out and "(50% off)" in out
    assert "GPU-hours in all (self-hosted stages): 0.00" in out 
    assert [line for line in out.splitlines() if line.startswith("score ")][0].endswith("hosted")
    # a discount of its own, and a bad one named in one line
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   generate__score__price_in=1.0, generate__score__price_out=1.0, generate__score__batch_discount=0.25)
    rc, out, _ = bft(capsys, "plan", "--config", cfg, "--format", "json")
    s = json.loads(out)["stages"]["score"]
    assert s["cost_batch"] == round(s["cost_online"] * 0.75, 2)
    cfg = run_file(tmp_path, tiny_models, bpe_tokenizer_path, str(tmp_path / "run"), [corpus],
                   generate__score__price_in=1.0, generate__score__batch_discount=1.5)
    rc, _, err = bft(capsys, "plan", "--config", cfg)
    assert rc == 1 and "batch_discount the share the Batch API takes off" in err and len(err.strip().splitlines()) == 1
    # bft rebuild reads the run file with these keys too (it ignores them)
    from bft.run_file import load_run

    assert [sp.stage for sp in load_run(cfg).stages] == ["backtranslate", "score"]


def test_plan_estimates_the_documents_prepare_kept_uncounted_from_a_counted_sample(tmp_path, bpe_tokenizer_path,
                                                                                  fixture_texts):
    """Candidates whose n_tokens is null (kept by their upper bound) are not summed as 0: a sample of
    them is counted with prepare's tokenizer; a sample of all of them gives the exact total."""
    from types import SimpleNamespace

    import numpy as np
    from tokenizers import Tokenizer

    import schemas
    import storage
    from bft.plan_inputs import candidates
    from schemas.layout import RunLayout

    layout = RunLayout(str(tmp_path / "run"))
    texts = fixture_texts[:30]
    exact = [len(e.ids) for e in Tokenizer.from_file(bpe_tokenizer_path).encode_batch(texts, add_special_tokens=False)]
    for k in range(2):
        rows = [{"id": f"d{i:02d}", "text": t, "source": None, "url": None, "n_chars": len(t),
                 "n_tokens": None if i % 3 else n, "shard": k, "text_hash": str(i)}
                for i, (t, n) in enumerate(zip(texts, exact)) if i % 2 == k]
        path = layout.candidates_shard(k, 2)
        storage.write_parquet(schemas.to_table(rows, schemas.CANDIDATE, path), path)
    storage.write_text(layout.prepare_stats, "{}")
    plan = SimpleNamespace(layout=layout, prepare=SimpleNamespace(tokenizer=bpe_tokenizer_path))
    whole = candidates(plan, sample_docs=100)
    assert whole["rows"] == 30 and whole["doc_tokens"] == sum(exact)
    assert sorted(np.repeat(whole["lengths"], whole["weights"].astype(int))) == sorted(exact)
    assert "20 documents kept uncounted, estimated from 20" in whole["doc_tokens_source"]
    one = candidates(plan, sample_docs=1)
    assert one["doc_tokens"] == sum(exact[::3]) + 20 * one["lengths"][-1] and one["weights"][-1] == 20


def test_the_shared_prefix_is_the_template_text_before_the_first_field(tiny_models, tmp_path):
    """What a prefix cache can reuse of each stage's prompts. The method's prompts are
    kept as the papers write them (generation/templates.py): backtranslate and score put their fixed text first;
    rewrite puts the draft (the document) before its long instruction, so only its first sentence is
    shared."""
    from transformers import AutoTokenizer

    from generation import budget
    from generation.prompting import render
    from generation.templates import DEFAULTS

    tok = AutoTokenizer.from_pretrained(tiny_models["chat"])
    shared = {stage: budget.shared_prefix_tokens(tok, stage) for stage in ("backtranslate", "score", "rewrite")}
    for stage, n in shared.items():
        head = DEFAULTS[stage].user.split("<")[0]        # the template's text before its first field
        prompt = render(tok, None, DEFAULTS[stage].user)
        text = tok.decode(tok(prompt, add_special_tokens=False)["input_ids"][:n])
        assert text.strip() and head.startswith(text.split("[INST]")[-1].strip()[:len(head)]), (stage, text)
        assert len(head) - len(text.split("[INST]")[-1].strip()) < 20, (stage, text)  # all but the field's edge
    assert shared["score"] > 10 * max(shared["backtranslate"], shared["rewrite"]) and min(shared.values()) > 5
    assert budget.shared_prefix_tokens(None, "score") is None
    assert budget.prefix_share(100, 10, 4000) == 0.25 and budget.prefix_share(None, 10, 4000) is None

    # what the shards record: output tokens per row sent, and the shared prefix's share of their prompts
    from schemas.layout import RunLayout

    root = tmp_path / "run"
    layout = RunLayout(str(root))
    os.makedirs(root / "candidates")
    for k in range(2):
        open(layout.candidates_shard(k, 2), "wb").close()
    (root / "candidates" / "stats.json").write_text("{}")
    markers = [{"rows": 10, "finish_reasons": {"stop": 8, "not_sent": 2}, "output_tokens": 40, "prompt_tokens": 800,
                "prefix_tokens": 25},
               {"rows": 5, "finish_reasons": {"length": 5}, "output_tokens": 80, "prompt_tokens": 500}]  # an older shard
    for k, m in enumerate(markers):
        os.makedirs(os.path.dirname(layout.generation_metrics("score", k, 2)), exist_ok=True)
        open(layout.generation_metrics("score", k, 2), "w").write(json.dumps(m))
    assert budget.token_figures(layout, "score") == {"output_tokens_per_row": round(120 / 13, 1),
                                                     "prefix_share": 0.25}

"""`bft show ID`: one example's whole history in a release, for the reader who asks "where does this
pair come from, and why is it here (or not)?".

Read from the files the release was made from, as its manifest's lineage names them (candidates and
generation shards by name and sha256, in the release's own root: a root copied or moved elsewhere
reads its own files; a file changed or gone since is said, never silently read as if it were the
release's): the source document (url, crawl date, the head of its text), each stage's
row (model, instruction, score and reasoning, rewrite, parse error), and the verdict. An id in the
release: its split, and the models and stage configs that made it (its `made_by` keys, mapped by the
manifest). An id not in it: the first reason assemble dropped it for, by assemble's own rule
(beam_pipelines.assemble.recipes.verdicts on its row, with the release's recipe, threshold and curation), or,
for a pair that passed them, what the release records of the later drops (decontamination, duplicate
instructions, the report's examples, changes/removed.parquet); an id that was no candidate, prepare's
reject (its reason, file and line).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

import schemas
import storage
from beam_pipelines.assemble import recipes
from beam_pipelines.assemble.config import recipe_gates
from beam_pipelines.report.changes import read_stats
from lifecycle import release
from schemas import drops
from schemas.errors import UserError
from schemas.keys import instruction_key
from schemas.layout import SUCCESS, ReleaseLayout, RunLayout, parse_shard_name, release_split_of
from schemas.release_stats import ReleaseStats
from schemas.options import option, required

TEXT_HEAD = 500        # characters of the source document shown
STAGE_FIELDS = ("model", "instruction", "score", "reasoning", "response", "parse_error", "finish_reason",
                "input_truncated")


@dataclass
class ShowConfig:
    """The options of `bft show ID`: an example's whole history (its document, instruction, scores with
    reasoning, rewrite) and why the release keeps or dropped it."""

    id: str = required("the example's id (the Dolma document id of a web example, or a seed pair's id)")
    root: str | None = option(None, "run root whose sft/LATEST names the release (or the run file's `root:` with "
                              "--config)")
    release: str | None = option(None, "the release: a version under ROOT/sft, or a release folder (default: the one "
                                 "ROOT/sft/LATEST names)")
    format: str = option("text", "text, or one JSON document on stdout", choices=["text", "json"])

    def check(self) -> None:
        if not (self.root or self.release):
            raise UserError("needs a release: bft show ID --root ROOT (its LATEST), --release FOLDER, or --config "
                            "FILE with a `root:`")

    def folder(self) -> str:
        if self.release and self.root and not storage.exists(ReleaseLayout(self.release).manifest):
            return RunLayout(self.root).release(self.release)
        return release.resolve(self.release or self.root)


def main_show(cfg: ShowConfig) -> int:
    found = history(cfg.folder(), cfg.id)
    print(json.dumps(found, indent=2, ensure_ascii=False) if cfg.format == "json" else history_text(found))
    return 0


def history(folder: str, doc_id: str) -> dict:
    """The history of `doc_id` in the release at `folder` (module docstring), as plain JSON."""
    files = ReleaseLayout(folder)
    if not storage.exists(files.success):
        raise release.ReleaseError(f"{folder}: not a published release (no {SUCCESS})")
    manifest = json.loads(storage.read_text(files.manifest))
    stats = read_stats(folder)
    lineage, config = manifest.get("inputs") or {}, manifest.get("config") or {}
    out = {"id": doc_id, "release": manifest["version"], "folder": folder, "recipe": config.get("recipe"),
           "document": None, "stages": {}, "example": None, "verdict": None, "notes": []}
    example, instructions = _in_release(folder, doc_id)
    if example is not None:
        makers = lineage.get("made_by") or {}
        example["made_by"] = {k: {f: (makers.get(k) or {}).get(f) for f in ("stage", "model")}
                              for k in example.get("made_by") or []}
        out["example"] = example
    layout = RunLayout(root_of(folder))
    found = _candidate(layout, lineage, doc_id, out["notes"])
    if found is not None:
        k, n, cand = found
        out["document"] = {"shard": f"{k} of {n}", "url": cand.get("url"), "crawl_date": cand.get("crawl_date"),
                           "source": cand.get("source"), "n_tokens": cand.get("n_tokens"),
                           "n_chars": cand.get("n_chars"), "text_head": cand["text"][:TEXT_HEAD]}
        tables = _stage_rows(layout, lineage, k, doc_id, out["notes"])
        out["stages"] = {s: {f: t.column(f)[0].as_py() for f in STAGE_FIELDS} for s, t in tables.items()}
        if example is None:
            out["verdict"] = _dropped_why(doc_id, cand, tables, config, stats, instructions, folder)
    if example is not None:
        gate = stats.gate
        passed = (f", {gate.stage} {example['score']:g} >= {gate.threshold:g}"
                  if gate and example.get("score") is not None else "")
        out["verdict"] = (f"kept in {example['split']}" + (f" (recipe {config.get('recipe')}{passed}, curation, "
                          "dedup and the cap passed)" if example["origin"] == "web" else " (a seed pair)"))
    elif found is None:
        reject = _prepare_reject(layout, doc_id)
        if reject is None:
            raise UserError(f"{doc_id}: not in release {manifest['version']} ({folder}), not among the candidates "
                            "it was made from, nor in prepare's rejects: check the id")
        out["verdict"] = f"dropped by prepare: {reject['reason']} ({reject['detail']}; {reject['file']}:{reject['line']})"
    return out


def _in_release(folder: str, doc_id: str) -> tuple[dict | None, pa.Table]:
    """(the example's row with its split, or None; every web example's (id, instruction), for the
    duplicate-instruction check), reading the data files the manifest lists."""
    example, parts = None, []
    for path in release.data_files(folder):
        ids = storage.read_parquet(path, ["id", "origin", "instruction"])
        parts.append(ids.filter(pc.equal(ids["origin"], "web")).select(["id", "instruction"]))
        if example is None and pc.any(pc.equal(ids["id"], doc_id)).as_py():
            table = schemas.validate(storage.read_parquet(path), schemas.SFT, path)
            row = table.filter(pc.equal(table["id"], doc_id)).to_pylist()[0]
            row.pop("messages")
            split = release_split_of(path[len(folder.rstrip("/")) + 1:])
            example = {"split": split, **row}
    return example, pa.concat_tables(parts) if parts else pa.table({"id": [], "instruction": []})


def root_of(folder: str) -> str:
    """The run root of a release folder (ROOT/sft/<version>)."""
    return folder.rstrip("/").rsplit("/", 2)[0]


def _candidate(layout: RunLayout, lineage: dict, doc_id: str, notes: list[str]) -> tuple[int, int, dict] | None:
    """(shard, shards, the candidate row) of `doc_id` among the release's candidate shards, or None."""
    for entry in lineage.get("candidates") or []:
        _, k, n = parse_shard_name(entry["path"])
        path = layout.candidates_shard(k, n)
        if not storage.exists(path):
            notes.append(f"{path}: gone since the release was made (its documents cannot be shown)")
            continue
        if not pc.any(pc.equal(storage.read_parquet(path, ["id"])["id"], doc_id)).as_py():
            continue
        _changed(path, entry, notes)
        table = schemas.validate(storage.read_parquet(path), schemas.CANDIDATE, path)
        return k, n, table.filter(pc.equal(table["id"], doc_id)).to_pylist()[0]
    return None


def _changed(path: str, entry: dict, notes: list[str]) -> None:
    if entry.get("sha256") and release.sha256_of(path) != entry["sha256"]:
        notes.append(f"{path}: changed since the release was made; shown as it is now")


def _stage_rows(layout: RunLayout, lineage: dict, k: int, doc_id: str, notes: list[str]) -> dict[str, pa.Table]:
    """{stage: the id's one-row table} from the release's generation shards k."""
    out = {}
    for stage, entries in (lineage.get("generations") or {}).items():
        for entry in entries:
            _, shard, n = parse_shard_name(entry["path"])
            if shard != k:
                continue
            path = layout.generation_shard(stage, k, n)
            if not storage.exists(path):
                notes.append(f"{path}: gone since the release was made")
                continue
            _changed(path, entry, notes)
            table = schemas.validate(storage.read_parquet(path), schemas.GENERATION, path)
            row = table.filter(pc.equal(table["id"], doc_id))
            if row.num_rows:
                out[stage] = row
    return out


def _dropped_why(doc_id: str, cand: dict, tables: dict[str, pa.Table], config: dict, stats: ReleaseStats,
                 instructions: pa.Table, folder: str) -> str:
    """Why a candidate is not in the release: assemble's verdict on its row, else the later drops."""
    recipe = recipes.RECIPES[config["recipe"]]
    missing = [s for s in recipe.stages if s not in tables]
    if missing:
        return f"dropped: no row of {', '.join(missing)} for it ({drops.MISSING_SHARD}, or a shard left out)"
    cands = pa.Table.from_pylist([cand], schema=schemas.CANDIDATE)
    joined = recipes.join_stages(cands, {s: t for s, t in tables.items() if s in recipe.stages})
    curation = recipes.Curation(config["min_instruction_chars"], config["max_instruction_chars"])
    gate, other_gate = recipe_gates(config["recipe"], config.get("same_ids_as"), config.get("min_score"))
    reason = recipes.verdicts(joined, recipe, curation, gate)
    other = config.get("same_ids_as")
    if other and all(s in tables for s in recipes.RECIPES[other].stages):
        joined_other = recipes.join_stages(cands, {s: t for s, t in tables.items()
                                                   if s in set(recipe.stages) | set(recipes.RECIPES[other].stages)})
        reason = recipes.restrict(reason, recipes.verdicts(joined_other, recipes.RECIPES[other], curation,
                                                           other_gate), other)
    first = reason[0].as_py()
    if first is not None:
        return f"dropped: {first}"
    # passed the recipe and curation: the drops after them, as the release records them
    for pair in stats.decontamination.get("pairs") or []:
        if pair.get("id") == doc_id:
            return f"dropped: {drops.contaminated(pair['set'])} (shares {pair['ngram']!r} with an evaluation prompt)"
    key = instruction_key(joined["backtranslate.instruction"][0].as_py().strip())
    for other_id, text in zip(instructions["id"].to_pylist(), instructions["instruction"].to_pylist()):
        if instruction_key(text) == key:
            return f"dropped: {drops.DUPLICATE_INSTRUCTION} (the same instruction as {other_id}, the smallest id, kept)"
    for reason_, rows in (stats.examples.get("dropped") or {}).items():
        for row in rows:
            if row.get("id") == doc_id:
                return f"dropped: {reason_}" + (f" ({row['detail']})" if row.get("detail") else "")
    removed = ReleaseLayout(folder).changes("removed")
    if storage.exists(removed):
        table = storage.read_parquet(removed, ["id", "reason"])
        hit = table.filter(pc.equal(table["id"], doc_id))
        if hit.num_rows:
            return f"dropped: {hit['reason'][0].as_py()}"
    later = ([drops.NEAR_DUPLICATE] if config.get("near_dup_instruction_threshold") else []) + \
        ([drops.OVER_CAP] if config.get("max_examples") else [])
    return ("dropped: " + " or ".join(later) + " (after the recipe and curation; the release records which "
            "for the smallest ids only)") if later else "dropped after the recipe and curation (reason not recorded)"


def _prepare_reject(layout: RunLayout, doc_id: str) -> dict | None:
    """Prepare's reject row of `doc_id` in the release's root, or None."""
    for path in storage.list_files(layout.rejects):
        if not path.endswith(".parquet"):
            continue
        table = storage.read_parquet(path, ["file", "line", "id", "reason", "detail"])
        hit = table.filter(pc.equal(table["id"], doc_id))
        if hit.num_rows:
            return hit.to_pylist()[0]
    return None


def history_text(h: dict) -> str:
    """`history` as the terminal shows it."""
    lines = [f"{h['id']} in release {h['release']} ({h['folder']}): {h['verdict']}"]
    d = h.get("document")
    if d:
        lines.append(f"document (candidates shard {d['shard']}): {d['url'] or 'no url'}, crawled "
                     f"{d['crawl_date'] or '(no date)'}, {d['n_chars']:,} characters")
        lines += ["  " + line for line in d["text_head"].splitlines()[:8]]
    for stage, row in h["stages"].items():
        parts = [f"{stage} ({row['model']})"]
        if row["parse_error"]:
            parts.append(f"failed: {row['parse_error']}")
        if stage == "backtranslate" and row["instruction"]:
            parts.append(f"instruction: {row['instruction']}")
        if row["score"] is not None:
            parts.append(f"score {row['score']:g}" + (f": {row['reasoning']}" if row["reasoning"] else ""))
        if row["response"]:
            parts.append(f"response: {row['response']}")
        if row["input_truncated"]:
            parts.append("its document was cut in the prompt")
        lines.append(parts[0] + (": " + "; ".join(parts[1:]) if len(parts) > 1 else ""))
    e = h.get("example")
    if e:
        lines.append(f"example ({e['origin']}, {e['split']}): instruction: {e['instruction']}")
        lines.append(f"  response: {e['response']}")
        for key, m in (e.get("made_by") or {}).items():
            lines.append(f"  made by {key}: {m['stage']} with {m['model']} (manifest inputs.made_by)")
    lines += [f"note: {n}" for n in h["notes"]]
    return "\n".join(lines)

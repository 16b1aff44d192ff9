"""A release's statistics (its stats.json) as one typed, mergeable object, and the one merge rule of
statistics.

`merge` is how every count of the pipeline adds up (datatrove's `Stats` pattern): numbers add, lists
of counts add element-wise (histograms), dicts add key by key, and an object with a `merge` method
(corpus_stats' `Uniques`, `Smallest`) merges itself. assemble's shard partials are merged with it
(beam_pipelines.assemble.corpus_stats), and `ReleaseStats.merge` (`+`) adds two releases' counts with
it, its derived numbers (pass rates, mean lengths) computed again from the sums.

`ReleaseStats` is what stats.json holds: `from_dict` reads it (old releases' files too: a section a
release predates is absent) and `to_dict` writes the same keys in the same order, so that a file read
and written again is byte-identical. The report, the alerts, `bft show` and `bft rebuild` read numbers
from it, the funnel's drop reasons as `schemas.drops.Drop` (with their funnel step), never by key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from schemas import drops


def merge(a, b):
    """The sum of two statistics (module docstring); None is nothing."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out.get(k), v)
        return out
    if hasattr(a, "merge"):
        return a.merge(b)
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    return a + b


def _rate(part: int, whole: int, digits: int = 4) -> float:
    return round(part / whole, digits) if whole else 0.0


@dataclass(frozen=True)
class Funnel:
    """Every candidate accounted for: `candidates` = `web_examples` + the rows `dropped` (by reason,
    most first); prepare's own funnel (`dolma`: input_records, kept, dropped); the seed pairs (input,
    kept, dropped); the released splits."""

    candidates: int = 0
    dropped: dict[drops.Drop, int] = field(default_factory=dict)
    web_examples: int = 0
    dolma: dict | None = None
    seed: dict = field(default_factory=lambda: {"input": 0, "kept": 0, "dropped": {}})
    train: int = 0
    validation: int = 0

    @property
    def total(self) -> int:
        return self.train + self.validation

    def dropped_at(self, *steps: drops.Step) -> dict[drops.Drop, int]:
        """The drops at the given funnel steps, by reason."""
        return {r: n for r, n in self.dropped.items() if r.step in steps}

    def to_dict(self) -> dict:
        return {"dolma": self.dolma, "candidates": self.candidates, "dropped": dict(self.dropped),
                "web_examples": self.web_examples, "seed": self.seed,
                "final": {"train": self.train, "validation": self.validation, "total": self.total}}

    @classmethod
    def from_dict(cls, d: dict) -> "Funnel":
        final = d.get("final") or {}
        return cls(candidates=d.get("candidates", 0),
                   dropped={drops.parse(r): n for r, n in (d.get("dropped") or {}).items()},
                   web_examples=d.get("web_examples", 0), dolma=d.get("dolma"),
                   seed=d.get("seed") or {"input": 0, "kept": 0, "dropped": {}},
                   train=final.get("train", 0), validation=final.get("validation", 0))

    def merge(self, other: "Funnel") -> "Funnel":
        dropped = merge(dict(self.dropped), dict(other.dropped))
        return Funnel(self.candidates + other.candidates, dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
                      self.web_examples + other.web_examples, merge(self.dolma, other.dolma),
                      merge(self.seed, other.seed), self.train + other.train, self.validation + other.validation)


@dataclass(frozen=True)
class StageStats:
    """One generation stage's counts over the shards read (schemas.outcomes.shard_summary, plus the
    requests `sent`, the rows `not_sent` by reason and the parse failures of the rows sent), and the
    models that made its shards."""

    counts: dict
    model: str = ""

    def count(self, name: str, default=0):
        return self.counts.get(name, default)

    @property
    def rows(self) -> int:
        return self.counts.get("rows", 0)

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)

    @property
    def sent(self) -> int:
        """Rows a model was asked about (older releases did not count them: every row)."""
        return self.counts.get("sent", self.rows)

    @property
    def not_sent(self) -> dict[str, int]:
        return self.counts.get("not_sent") or {}

    @property
    def sent_failures(self) -> dict[str, int]:
        """Parse failures among the rows sent, by category (older releases: every parse failure)."""
        return self.counts.get("sent_failures", self.counts.get("parse_failures")) or {}

    @property
    def pass_rate(self) -> float:
        """Rows parsed, of all the stage's rows."""
        return _rate(self.ok, self.rows)

    @property
    def pass_rate_of_sent(self) -> float:
        return _rate(self.ok, self.counts["sent"]) if self.counts.get("sent") else self.pass_rate

    @property
    def score_histogram(self) -> list[int]:
        return self.counts.get("score_histogram") or []

    @property
    def digit_mass_mean(self) -> float | None:
        """The digits' mean probability mass of a logprob-mode scoring stage (None in generate mode)."""
        mass = self.counts.get("digit_mass")
        return round(mass["sum"] / mass["rows"], 4) if mass else None

    def to_dict(self) -> dict:
        return {**self.counts, "pass_rate": self.pass_rate, "model": self.model}

    @classmethod
    def from_dict(cls, d: dict) -> "StageStats":
        return cls({k: v for k, v in d.items() if k not in ("pass_rate", "model")}, d.get("model") or "")

    def merge(self, other: "StageStats") -> "StageStats":
        models = sorted({m.strip() for m in f"{self.model},{other.model}".split(",") if m.strip()})
        return StageStats(merge(self.counts, other.counts), ", ".join(models))


@dataclass(frozen=True)
class OriginStats:
    """The released examples of one origin (web, seed): rows per split, token and character sums,
    length histograms, unique trigrams and the trigram sample (corpus_stats.final_partial)."""

    counts: dict
    train: int = 0
    validation: int = 0

    @property
    def total(self) -> int:
        return self.train + self.validation

    def avg_tokens(self, field_name: str) -> float:
        """Mean tokens of the instruction or the response."""
        return round(self.counts.get(f"tokens_{field_name}", 0) / self.total, 2) if self.total else 0.0

    def length_histogram(self, field_name: str) -> list[int]:
        return self.counts.get(f"length_histogram_{field_name}") or []

    @property
    def trigram_sample(self) -> dict:
        return self.counts.get("trigram_sample") or {}

    def to_dict(self) -> dict:
        return {**self.counts, "rows": {"train": self.train, "validation": self.validation, "total": self.total},
                "avg_tokens_instruction": self.avg_tokens("instruction"),
                "avg_tokens_response": self.avg_tokens("response")}

    @classmethod
    def from_dict(cls, d: dict) -> "OriginStats":
        rows = d.get("rows") or {}
        return cls({k: v for k, v in d.items() if k not in ("rows", "avg_tokens_instruction", "avg_tokens_response")},
                   rows.get("train", 0), rows.get("validation", 0))

    def merge(self, other: "OriginStats") -> "OriginStats":
        return OriginStats(merge(self.counts, other.counts), self.train + other.train,
                           self.validation + other.validation)


@dataclass(frozen=True)
class GateStats:
    """The gate's own pass rate: rows scored at or over the threshold, of the rows with a score."""

    stage: str
    threshold: float
    scored: int = 0
    passed: int = 0
    digit_mass_mean: float | None = None

    @property
    def pass_rate(self) -> float | None:
        return round(self.passed / self.scored, 4) if self.scored else None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "threshold": self.threshold, "scored": self.scored, "passed": self.passed,
                "pass_rate": self.pass_rate, "digit_mass_mean": self.digit_mass_mean}

    @classmethod
    def from_dict(cls, d: dict) -> "GateStats":
        return cls(d["stage"], d["threshold"], d.get("scored", 0), d.get("passed", 0), d.get("digit_mass_mean"))

    def merge(self, other: "GateStats") -> "GateStats":
        return replace(self, scored=self.scored + other.scored, passed=self.passed + other.passed)


# The sections that hold a typed object in memory (dicts of them for stages and origins).
_TYPED = {"funnel": Funnel, "gate": GateStats}
_TYPED_MAPS = {"stages": StageStats, "by_origin": OriginStats}
# What assemble's driver adds after the pass (the parent release, the alerts, ...): not in a new object's file
# until set (`with_`).
_DRIVER_FIELDS = ("parent", "changes", "alerts", "trend", "paper_lengths", "timing")


@dataclass(frozen=True)
class ReleaseStats:
    """A release's stats.json (module docstring). Fields in the file's order; those from `parent` on
    are set by assemble's driver after the pass (`with_`: a new object's file has none of them until
    then), and a section a release does not have (an older one) is not written back."""

    version: str = ""
    recipe: str = ""
    funnel: Funnel = field(default_factory=Funnel)
    stages: dict[str, StageStats] = field(default_factory=dict)
    score_histogram: dict | None = None     # the gate stage's scores: stage, threshold, edges, counts
    gate: GateStats | None = None
    by_origin: dict[str, OriginStats] = field(default_factory=dict)
    length_edges: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    decontamination: dict = field(default_factory=dict)
    near_duplicate_instructions: dict = field(default_factory=dict)
    examples: dict = field(default_factory=lambda: {"kept": [], "dropped": {}})
    browse: dict = field(default_factory=lambda: {"rows": [], "strata": {}})
    score_distributions: dict = field(default_factory=dict)
    trigram_sample_size: int = 1000
    config: dict = field(default_factory=dict)
    code_revision: str | None = None
    missing_shards: list = field(default_factory=list)
    schema_version: str | None = None
    finished_at: str | None = None
    parent: str | None = None
    changes: dict = field(default_factory=dict)    # beam_pipelines.report.changes.changes
    alerts: list = field(default_factory=list)
    trend: list = field(default_factory=list)
    paper_lengths: dict | None = None
    timing: dict = field(default_factory=dict)
    # the keys the file has, in its order (a new release's: every field); keys this code does not know
    keys: tuple = field(default=(), compare=False, repr=False)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, stats: "ReleaseStats | dict") -> "ReleaseStats":
        """`stats` as a ReleaseStats (a dict is read with `from_dict`)."""
        return stats if isinstance(stats, ReleaseStats) else cls.from_dict(stats)

    @classmethod
    def from_dict(cls, d: dict) -> "ReleaseStats":
        known = {f.name for f in fields(cls)} - {"keys", "extra"}
        values = {}
        for k, v in d.items():
            if k in _TYPED and v is not None:
                v = _TYPED[k].from_dict(v)
            elif k in _TYPED_MAPS:
                v = {name: _TYPED_MAPS[k].from_dict(s) for name, s in (v or {}).items()}
            if k in known:
                values[k] = v
        return cls(**values, keys=tuple(d), extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        """stats.json's content: the keys of the file it was read from, else every field, in order."""
        names = self.keys or self._pass_keys()
        out = {}
        for k in names:
            v = getattr(self, k) if k not in self.extra else self.extra[k]
            if k in _TYPED_MAPS:
                v = {name: s.to_dict() for name, s in v.items()}
            elif hasattr(v, "to_dict"):
                v = v.to_dict()
            out[k] = v
        return out

    def with_(self, **changes) -> "ReleaseStats":
        """A copy with these fields set (written after the ones it has)."""
        keys = self.keys or self._pass_keys()
        return replace(self, keys=keys + tuple(k for k in changes if k not in keys), **changes)

    @classmethod
    def _pass_keys(cls) -> tuple:
        return tuple(f.name for f in fields(cls) if f.name not in ("keys", "extra", *_DRIVER_FIELDS))

    # ---- what several readers compute from it ---------------------------------------------------
    @property
    def shares(self) -> dict:
        """The kept share (web examples / candidates), the error share (transient failures and refusals /
        requests sent, over the stages) and each stage's pass rate."""
        from schemas.outcomes import ENGINE_ERROR, REFUSALS

        sent = sum(s.count("sent") for s in self.stages.values())
        failed = sum(s.sent_failures.get(k, 0) for s in self.stages.values() for k in (ENGINE_ERROR, *REFUSALS))
        f = self.funnel
        return {"kept_share": f.web_examples / f.candidates if f.candidates else None,
                "error_share": failed / sent if sent else None,
                "pass_rates": {name: s.pass_rate for name, s in self.stages.items()}}

    def decontaminated(self) -> tuple[int, int]:
        """(pairs decontamination dropped, pairs that reached it): the recipe's pairs, which then went
        through decontamination, exact and near-duplicate instructions and the cap, or into the release."""
        lost = sum(self.funnel.dropped_at(drops.Step.DECONTAMINATION).values())
        later = sum(self.funnel.dropped.get(r, 0) for r in drops.LATE_DROPS)
        return lost, lost + later + self.funnel.web_examples

    # ---- merging --------------------------------------------------------------------------------
    def merge(self, other: "ReleaseStats") -> "ReleaseStats":
        """The counts of both (funnel, stages, origins, gate, score histograms, decontamination and
        near-duplicate drops, the missing shards), derived numbers computed from the sums; the
        descriptive fields (version, recipe, config, examples, ...) are this one's."""
        def maps(a: dict, b: dict) -> dict:
            return {k: merge(a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a]}

        hist = self.score_histogram
        if hist and other.score_histogram:
            hist = {**hist, "counts": merge(hist.get("counts"), other.score_histogram.get("counts"))}
        dists = {stage: {**d, **{k: merge(d.get(k), (other.score_distributions.get(stage) or {}).get(k))
                                 for k in ("kept", "dropped", "non_integer")}}
                 for stage, d in self.score_distributions.items()}
        decon = dict(self.decontamination)
        if decon or other.decontamination:
            decon = {**decon, "dropped": merge(decon.get("dropped"), other.decontamination.get("dropped")),
                     "pairs": sorted((decon.get("pairs") or []) + (other.decontamination.get("pairs") or []),
                                     key=lambda p: p["id"])}
        near = self.near_duplicate_instructions
        if near:
            near = {**near, "dropped": near.get("dropped", 0) + other.near_duplicate_instructions.get("dropped", 0)}
        return replace(self, funnel=self.funnel.merge(other.funnel), stages=maps(self.stages, other.stages),
                       by_origin=maps(self.by_origin, other.by_origin), gate=merge(self.gate, other.gate),
                       score_histogram=hist, score_distributions=dists, decontamination=decon,
                       near_duplicate_instructions=near,
                       missing_shards=sorted(set(self.missing_shards) | set(other.missing_shards)))

    __add__ = merge

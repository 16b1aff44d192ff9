"""The five LLM stages as pure pieces: which inputs a stage reads, how a row becomes a prompt, how an
output becomes fields (distilabel's format_input / format_output), and the sampling defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from generation import parsing


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: str | None            # the generation stage whose shard k it reads beside candidates shard k
    doc_field: str | None           # the template value that is cut when a prompt is too long
    parse: Callable[[str, dict, str | None], tuple[dict, str | None]]
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512

    def values(self, row: dict) -> tuple[dict[str, str] | None, str | None]:
        """Template values for a joined row, or (None, reason) when an input is missing."""
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            return None, "missing_text"
        if self.upstream:
            if row.get("upstream_missing"):
                return None, "missing_upstream_row"
            instruction = row.get("instruction")
            if not instruction:
                return None, f"upstream_failed:{row.get('upstream_error') or 'no_instruction'}"
        if self.name == "backtranslate":
            return {"response": text}, None
        if self.name == "distill":
            return {"instruction": row["instruction"]}, None
        if self.name == "rate":
            return {"instruction": row["instruction"], "input": "", "response": text}, None
        return {"instruction": row["instruction"], "response": text}, None


STAGES = {
    "backtranslate": StageSpec("backtranslate", None, "response",
                               lambda out, row, fin: parsing.parse_instruction(out, row["text"], fin), max_new_tokens=256),
    "score": StageSpec("score", "backtranslate", "response",
                       lambda out, row, fin: parsing.parse_score(out, fin), max_new_tokens=512),
    "rewrite": StageSpec("rewrite", "backtranslate", "response",
                         lambda out, row, fin: parsing.parse_rewrite(out, fin), max_new_tokens=2048),
    "distill": StageSpec("distill", "backtranslate", None,
                         lambda out, row, fin: parsing.parse_distill(out, fin), max_new_tokens=1024),
    "rate": StageSpec("rate", "backtranslate", "response",
                      lambda out, row, fin: parsing.parse_rating(out, fin), max_new_tokens=256),
}

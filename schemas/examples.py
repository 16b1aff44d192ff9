"""SFT example rows (the SFT schema of a release), built from column arrays: used by assemble for web
and seed examples and by `bft seed`. A data-source tag is the system turn (Humpback, Li et al. 2023a,
section 2.3; Nguyen et al. 2024 App. A.3); the defaults are those papers' tags."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

import schemas

# 6. Data-source tags for SFT, Li et al. 2023a; Nguyen et al. 2024 App. A.3
SEED_TAG = "Answer in the style of an AI Assistant."
WEB_TAG = "Answer with knowledge from web search."


def messages_column(instructions: pa.Array, responses: pa.Array, tag: str | None) -> pa.Array:
    """The chat form of each pair, as TRL's SFTTrainer and chat templates take it:
    [system: tag]?, user: instruction, assistant: response. The tag is a system prompt, as in
    Humpback (Li et al. 2023a, section 2.3)."""
    n = len(instructions)
    roles = (["system"] if tag else []) + ["user", "assistant"]
    parts = ([pa.array([tag] * n, pa.string())] if tag else []) + [instructions, responses]
    k = len(parts)
    contents = pa.concat_arrays([p.combine_chunks() if isinstance(p, pa.ChunkedArray) else p for p in parts])
    contents = contents.take(pa.array(np.arange(k * n).reshape(k, n).T.ravel()))
    role_arr = pa.array(np.tile(np.array(roles, dtype=object), n), pa.string())
    structs = pa.StructArray.from_arrays([role_arr, contents], fields=list(schemas.MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, k * n + 1, k), pa.int32()), structs)


def examples(instructions, responses, *, ids, origin: str, recipe: str | None, tag: str | None, scores,
             n_tokens_instruction, n_tokens_response, urls=None, crawl_dates=None,
             made_by: list[str] | None = None) -> pa.Table:
    """SFT-schema rows from column arrays (instructions and responses already stripped). The lineage:
    `urls` and `crawl_dates` of the source documents (arrays, or None: nulls) and `made_by`, the maker
    keys of the stages that made every one of these rows (None: null, as for seed pairs)."""
    n = len(ids)
    table = pa.table({
        "id": ids,
        "origin": pa.array([origin] * n, pa.string()),
        "recipe": pa.array([recipe] * n, pa.string()),
        "instruction": instructions,
        "response": responses,
        "messages": messages_column(instructions, responses, tag),
        "tag": pa.array([tag] * n, pa.string()),
        "score": pa.array(scores, pa.float32()) if scores is not None else pa.nulls(n, pa.float32()),
        "n_tokens_instruction": pa.array(n_tokens_instruction, pa.int32()),
        "n_tokens_response": pa.array(n_tokens_response, pa.int32()),
        "url": pa.nulls(n, pa.string()) if urls is None else urls,
        "crawl_date": pa.nulls(n, pa.string()) if crawl_dates is None else crawl_dates,
        "made_by": pa.array([made_by] * n, pa.list_(pa.string())),
    })
    return schemas.validate(table.replace_schema_metadata(schemas.SFT.metadata), schemas.SFT, "examples")

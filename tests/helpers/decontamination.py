"""What decontamination is tested on: evaluation sets in their published formats (AlpacaEval's JSON,
MT-Bench's question.jsonl), rows that share 13 words with them, and those rows planted in the literal
generation shards of tests/helpers/assemble.py."""
from tests.helpers.assemble import rewrite_shard, write_marker

ALPACA = [{"instruction": "Write a detailed essay about the economic consequences of the industrial revolution "
                          "in nineteenth century Britain and its colonies.", "dataset": "helpful_base"},
          {"instruction": "hi", "dataset": "oasst"}]
MT_BENCH = [{"question_id": 81, "category": "writing",
             "turns": ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
                       "experiences and must-see attractions.",
                       "Rewrite your previous response. Start every sentence with the letter A."]}]
# 13 words of the AlpacaEval prompt, in another case and punctuation
IN_INSTRUCTION = "Quick task! WRITE a detailed essay -- about the Economic consequences of the industrial revolution, in short."
# 13 words of MT-Bench's first turn
IN_RESPONSE = "Sure. compose an ENGAGING travel blog post about a recent trip to Hawaii; highlighting the food."


def plant(root, instructions: dict[str, str] = {}, responses: dict[str, str] = {}, scores: dict[str, float] = {}):
    """Backtranslate instructions, rewrite responses and scores of some ids changed, every marker made
    from the new shards."""
    def change(stage):
        def apply(r):
            if r["id"] in instructions and r["instruction"] is not None:   # carried downstream too
                r["instruction"] = instructions[r["id"]]
            if stage == "rewrite" and r["id"] in responses:
                r["response"] = responses[r["id"]]
            if stage == "score" and r["id"] in scores:
                r["score"] = scores[r["id"]]
        return apply
    for k in range(2):
        for stage in ("backtranslate", "score", "rewrite"):
            rewrite_shard(root, stage, k, change(stage))
        for stage in ("distill", "rate"):
            write_marker(root, stage, k, 2)

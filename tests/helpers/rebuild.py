"""A run file (YAML) for `bft rebuild`/`plan`/`pilot` driving every verb with the tiny models, on the
local runner, each key overridable."""
import yaml


def run_file(tmp_path, tiny_models, tokenizer, root_dir, inputs, **changes) -> str:
    doc = {
        "root": root_dir,
        "prepare": {"input": inputs, "tokenizer": tokenizer, "max_tokens": 4000, "num_shards": 2,
                    "beam_args": ["--runner=FnApiRunner"]},
        "generate": {"engine": "hf", "max_new_tokens": 6, "batch_size": 8,
                     "backtranslate": {"model": tiny_models["chat"]},
                     "score": {"model": tiny_models["chat"], "score_mode": "logprob"}},
        # allow_empty: the tiny random models may write no usable pair (a critical alert, tests/test_alerts.py)
        "assemble": {"recipe": "filter", "min_score": 0, "max_instruction_chars": 5000, "min_instruction_chars": 0,
                     "allow_empty": True, "beam_args": ["--runner=FnApiRunner"]},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            stage, _, opt = name.partition("__")
            target = doc[section][stage] if opt else doc[section]
            target[opt or name] = value
        else:
            doc[section] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)

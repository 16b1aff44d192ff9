"""The training handoff to TRL: SFTTrainer(assistant_only_loss=True) on release rows with our chat
template trains on exactly the tokens `bft train` trains on (training/data.py), row by row."""
import pytest

from generation.templates import LLAMA2_CHAT_TEMPLATE
from training import data, train

trl = pytest.importorskip("trl")

ROWS = [
    {"messages": [{"role": "system", "content": "Answer with knowledge from web search."},
                  {"role": "user", "content": "Why is the sky blue?"},
                  {"role": "assistant", "content": "Rayleigh scattering of sunlight."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "  Teal.  "}]},
    {"messages": [{"role": "system", "content": "Answer in the style of an AI Assistant."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
]


def test_generation_markers_change_no_rendering(tiny_models):
    tok = train.load_tokenizer(tiny_models["chat"])
    assert "{% generation %}" in tok.chat_template
    plain = LLAMA2_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for row in ROWS:
        assert tok.apply_chat_template(row["messages"], tokenize=False) == \
            tok.apply_chat_template(row["messages"], tokenize=False, chat_template=plain)


def test_trl_assistant_only_labels_equal_ours_row_by_row(tiny_models, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    tok = train.load_tokenizer(tiny_models["chat"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chat"])
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, max_length=1024,
                         report_to="none", use_cpu=True, per_device_train_batch_size=1, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                             processing_class=tok)
    prepared = trainer.train_dataset
    assert len(prepared) == len(ROWS)
    for i, row in enumerate(ROWS):
        ours = data.encode(tok, data.conversation("sft", row))
        batch = trainer.data_collator([prepared[i]])
        assert batch["input_ids"][0].tolist() == ours["input_ids"], i
        assert batch["labels"][0].tolist() == ours["labels"], i


def test_trl_trains_on_a_release_loaded_from_its_data_folder(tiny_models, tmp_path, bpe_tokenizer_path):
    """TRL reads a release as a training team loads it, `load_dataset(<release>)` (the
    card's configs: data/), and trains on the tokens `bft train` would."""
    import datasets
    from transformers import AutoModelForCausalLM

    from lifecycle import release
    from tests.helpers.assemble import run, write_root, write_seed

    root = write_root(str(tmp_path / "run"), bpe_tokenizer_path)
    run(root, seed_data=write_seed(str(tmp_path / "seed.jsonl")), version="v1")
    loaded = datasets.load_dataset(release.resolve(str(tmp_path / "run" / "sft")))["train"]
    tok = train.load_tokenizer(tiny_models["chat"])
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, max_length=1024,
                         report_to="none", use_cpu=True, per_device_train_batch_size=1, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_models["chat"]), args=args,
                             train_dataset=loaded.select_columns(["messages"]), processing_class=tok)
    assert len(trainer.train_dataset) == loaded.num_rows > 0
    first = {"messages": loaded[0]["messages"]}
    ours = data.encode(tok, data.conversation("sft", first))
    assert trainer.data_collator([trainer.train_dataset[0]])["labels"][0].tolist() == ours["labels"]

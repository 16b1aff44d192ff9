"""`bft train`: fine-tune a causal LM as the backward, forward or SFT model, with transformers' Trainer.

Why Trainer: the loss mask must match generation's prompt rendering token for token
(training/data.py builds it from the same renderer), which a custom collator on Trainer gives
exactly, and examples too long are left out rather than cut. TRL's SFTTrainer with
assistant_only_loss=True is a supported consumer of releases: our Llama-2 template carries
`{% generation %}` markers, and a test checks TRL's labels equal data.encode's. Trainer brings what
matters at scale: bf16, gradient accumulation, FSDP and multi-node through `accelerate launch`
(docs/TRAINING.md), checkpoints and resume.

Defaults are the paper's (Nguyen et al. 2024, App. A.3-A.4): cosine schedule, batch 32 (per-device batch x
gradient accumulation x processes), weight decay 0.1, dropout 0.1, lr 1e-5; length-grouped batches.
The output is a standard Hugging Face folder (config, safetensors, tokenizer with a chat template;
Llama-2's when the base model has none) that the hf, openai (`vllm serve` / `transformers serve`)
and vllm engines load. It appears whole: written beside, then renamed into place; `bft_train.json`
in it records the config, data, losses and tokens/s.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

from schemas.errors import UserError
from schemas.layout import RunLayout
from schemas.options import option, required
from training import data

log = logging.getLogger("bft.train")

# Config fields that mean dropout in the common causal-LM families (Llama: attention_dropout).
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob")
MARKER = "bft_train.json"
# Nguyen et al. 2024 train the 7B SFT models for 600, 900 or 1,200 steps and report the best.
PAPER_SFT_STEPS = (600, 900, 1200)
# Neither paper states how long its seed (backward, forward) models train: by default each is evaluated
# after each of these epochs on seed pairs held out by key, and the epoch of lowest validation loss is kept.
SEED_EPOCHS = (1, 2, 3, 4, 5)


@dataclass
class TrainConfig:
    """The options of `bft train` (flags and the `train:` section of a run file)."""

    role: str = required("which model to train", choices=list(data.ROLES))
    base_model: str = required("model folder or hub id to fine-tune")
    root: str | None = option(None, "run root: --data defaults to ROOT/seed/seed.parquet (backward, forward) or "
                              "ROOT's latest release (sft), --output to ROOT/models/ROLE")
    data: str | None = option(None, "backward/forward: seed pairs (bft seed output, Parquet or JSON lines); sft: "
                              "a release (folder, ROOT/sft or run root: its LATEST), or a file")
    output: str | None = option(None, "model folder to write (local path)")
    max_steps: int = option(-1, "optimizer steps (-1: --select-steps, else --epochs)")
    epochs: float = option(1.0, "passes over the data (with --select-steps none, or for a seed model with "
                           "--seed-validation-fraction 0)")
    select_steps: str | None = option(None, "steps at which to evaluate the validation split, e.g. 600,900,1200: "
                                      "train to the largest and keep the step with the lowest validation loss "
                                      "(default for --role sft: 600,900,1200, the paper's 7B runs; for backward "
                                      "and forward: the end of epochs 1-5; 'none': train --epochs)")
    seed_validation_fraction: float = option(0.05, "backward/forward: share of the seed pairs held out (by id) to "
                                             "choose the epoch by validation loss (at least one pair)")
    lr: float = option(1e-5, "learning rate: 1e-5 (7B) in the paper; 5.5e-6 for 70B")
    batch_size: int = option(32, "effective batch (sequences per step)")
    per_device_batch_size: int = option(4, "sequences per device and micro-step")
    grad_accum: int | None = option(None, "default: batch-size / (per-device batch x processes)")
    weight_decay: float = option(0.1, "AdamW weight decay")
    dropout: float = option(0.1, "set on every dropout field of the model config while training")
    warmup_ratio: float = option(0.03, "share of steps warming up")
    max_length: int | None = option(None, "longest example in tokens (default: the model's context)")
    bf16: bool = option(False, "train in bf16")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    seed: int = option(0, "seed of data order and initialisation")
    logging_steps: int = option(10, "steps between logged losses", run_only=True)
    save_steps: int = option(500, "checkpoint interval (OUTPUT.checkpoints/)", run_only=True)
    resume: bool = option(False, "continue from the last checkpoint in OUTPUT.checkpoints/", run_only=True)
    overwrite: bool = option(False, "train again although OUTPUT holds a trained model", run_only=True)
    fsdp: str | None = option(None, "Trainer's fsdp option, e.g. 'full_shard auto_wrap' (or use accelerate launch "
                              "with training/accelerate/*.yaml)")
    fsdp_config: str | None = option(None, "JSON file of Trainer's fsdp_config")

    def check(self) -> None:
        if self.data is None or self.output is None:
            if self.root is None:
                raise UserError("give --root, or both --data and --output")
            layout = RunLayout(self.root)
            if self.data is None:
                self.data = layout.root if self.role == "sft" else layout.seed_pairs
            if self.output is None:
                self.output = layout.model(self.role)

    def selected_steps(self, steps_per_epoch: int | None = None) -> tuple[int, ...]:
        """The steps compared on the validation split (empty: train --max-steps or --epochs); a seed
        model's default is the end of each of SEED_EPOCHS, given the optimizer steps of one epoch."""
        given = self.select_steps
        if given is None:
            if self.max_steps != -1:
                return ()
            if self.role == "sft":
                return PAPER_SFT_STEPS
            return tuple(e * steps_per_epoch for e in SEED_EPOCHS) if steps_per_epoch else ()
        if given.strip().lower() == "none":
            return ()
        try:
            steps = tuple(sorted({int(x) for x in given.split(",") if x.strip()}))
        except ValueError:
            steps = ()
        if not steps or steps[0] < 1:
            raise UserError(f"--select-steps {given!r}: give positive step numbers separated by commas, or 'none'")
        if self.max_steps != -1:
            raise UserError("give --select-steps or --max-steps, not both")
        return steps

    def holds_out_seed(self) -> bool:
        """Whether seed pairs are held out to choose a seed model's epoch (the default selection)."""
        return (self.role != "sft" and self.select_steps is None and self.max_steps == -1
                and self.seed_validation_fraction > 0)

    def accumulation(self, world_size: int) -> int:
        if self.grad_accum:
            return self.grad_accum
        per_step = self.per_device_batch_size * world_size
        if self.batch_size % per_step:
            raise UserError(f"--batch-size {self.batch_size} is not a multiple of per-device batch "
                             f"{self.per_device_batch_size} x {world_size} processes; pass --grad-accum")
        return self.batch_size // per_step


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from generation.templates import LLAMA2_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def set_dropout(config, p: float) -> dict:
    """Sets every dropout field the config has to p; returns the old values."""
    old = {}
    for name in DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), (int, float)):
            old[name] = getattr(config, name)
            setattr(config, name, p)
    return old


def run(cfg: TrainConfig) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, trainer_utils

    marker = os.path.join(cfg.output, MARKER)
    if os.path.exists(marker) and not cfg.overwrite:
        log.info("%s exists: this model is trained; pass --overwrite to train it again", marker)
        return {**json.load(open(marker)), "skipped": True}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = cfg.accumulation(world)
    cfg.selected_steps()  # a bad --select-steps is named before the model loads
    tokenizer = load_tokenizer(cfg.base_model)
    model_config = AutoConfig.from_pretrained(cfg.base_model)
    original_dropout = set_dropout(model_config, cfg.dropout)
    max_length = cfg.max_length or getattr(model_config, "max_position_embeddings", 4096)
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(staging_folder(cfg.output), ignore_errors=True)  # debris of a failed save
    train_rows, val_rows, source = data.load_rows(cfg.data)
    if not val_rows and cfg.holds_out_seed():
        train_rows, val_rows = data.hold_out(train_rows, cfg.seed_validation_fraction, cfg.seed)
    train_ds, too_long = data.build_dataset(tokenizer, cfg.role, train_rows, max_length)
    val_ds = data.build_dataset(tokenizer, cfg.role, val_rows, max_length)[0] if val_rows else None
    selected = cfg.selected_steps(-(-len(train_ds) // (cfg.per_device_batch_size * accum * world)))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, config=model_config, dtype=dtype)
    collator = data.PadCollator(tokenizer.pad_token_id)
    work = cfg.output.rstrip("/") + ".checkpoints"
    args = TrainingArguments(
        output_dir=work, max_steps=max(selected) if selected else cfg.max_steps, num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.per_device_batch_size, per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accum, weight_decay=cfg.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio, bf16=cfg.bf16,
        train_sampling_strategy="group_by_length", length_column_name="length", seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        fsdp=cfg.fsdp or "", fsdp_config=cfg.fsdp_config, use_cpu=not torch.cuda.is_available(),
        **({"activation_checkpointing": True} if cfg.gradient_checkpointing else {}))
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=train_ds, eval_dataset=val_ds)
    selector = None
    if selected and val_ds is not None:
        selector = step_selector(trainer, selected, original_dropout, staging_folder(cfg.output))
        trainer.add_callback(selector)
    elif selected:
        log.warning("--select-steps: %s has no validation split; the model of the last step is kept", source)
    resume = trainer_utils.get_last_checkpoint(work) if cfg.resume and os.path.isdir(work) else None
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    metrics = {"train_loss": result.training_loss, "steps": result.global_step, "wall_s": round(wall, 3),
               "tokens": collator.tokens, "tokens_per_s": round(collator.tokens / wall, 1) if wall else None,
               "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    if selector is not None and selector.best_step is not None:
        metrics["selection"] = {"eval_loss_at_step": selector.losses, "kept_step": selector.best_step}
        metrics["eval_loss"] = selector.losses[selector.best_step]
    elif val_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    summary = {"config": asdict(cfg), "data": source, "examples": len(train_ds), "left_out_too_long": too_long,
               "validation_examples": len(val_ds) if val_ds else 0,
               "batch": {"per_device": cfg.per_device_batch_size, "grad_accum": accum, "processes": world,
                         "effective": cfg.per_device_batch_size * accum * world},
               "metrics": metrics}
    save(trainer, tokenizer, original_dropout, cfg.output, summary,
         saved=selector is not None and selector.best_step is not None)
    if trainer.is_world_process_zero():
        shutil.rmtree(work, ignore_errors=True)
    return summary


def staging_folder(output: str) -> str:
    return output.rstrip("/") + ".partial"


def save_weights(trainer, original_dropout: dict, folder: str) -> None:
    """The model's weights and config into folder, with the base model's dropout values (inference
    configs keep them; the modules built for training keep theirs)."""
    training = {name: getattr(trainer.model.config, name) for name in original_dropout}
    for name, value in original_dropout.items():
        setattr(trainer.model.config, name, value)
    trainer.save_model(folder)
    for name, value in training.items():
        setattr(trainer.model.config, name, value)


def step_selector(trainer, steps: tuple[int, ...], original_dropout: dict, folder: str):
    """A callback that evaluates the validation split at each of `steps` and saves the model into
    `folder` whenever its loss is the lowest so far, so the published model is the best step's
    (`losses`, `best_step`)."""
    from transformers import TrainerCallback

    class StepSelector(TrainerCallback):
        def __init__(self):
            self.losses: dict[int, float] = {}
            self.best_step: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                control.should_evaluate = True
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step in steps and metrics and "eval_loss" in metrics:
                self.losses[state.global_step] = loss = float(metrics["eval_loss"])
                if self.best_step is None or loss < self.losses[self.best_step]:
                    self.best_step = state.global_step
                    save_weights(trainer, original_dropout, folder)
            return control

    return StepSelector()


def save(trainer, tokenizer, original_dropout: dict, output: str, summary: dict, saved: bool = False) -> None:
    """Writes the model folder beside `output`, then renames it into place (whole or not at all).
    Every process calls it: under FSDP, saving gathers the full state dict from all ranks. `saved`:
    the staging folder already holds the weights to publish (the selected step's)."""
    staging = staging_folder(output)
    if not saved:
        save_weights(trainer, original_dropout, staging)
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, MARKER), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(staging, output)

"""Benchmark of `bft train`: training tokens/s, beside a plain PyTorch loop on the same batches.

The model is a tiny Llama built here (training.tiny; hidden 256, 4 layers, an 8K BPE, unless told otherwise),
the data 512 synthetic (instruction, response) pairs (benchmarks.corpus.TextMaker). Both sides train
the forward role for the same steps with the same effective batch, AdamW and masked loss; the plain
loop has no scheduler, logging, length grouping or checkpoints: it is the floor that Trainer's
machinery is measured against. Tokens are the real (non-pad) tokens of the batches served.

    python -m benchmarks.train_bench [--steps 10] [--batch-size 16] [--hidden 256] [--layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from benchmarks.prepare_bench import WORK


def build(hidden: int, layers: int) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from benchmarks.corpus import TextMaker
    from benchmarks.prepare_bench import make_tokenizer
    from training.tiny import make_tiny_llama

    folder = os.path.join(WORK, f"train-{hidden}x{layers}")
    model, data = os.path.join(folder, "base"), os.path.join(folder, "pairs.parquet")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_tiny_llama(model, Tokenizer.from_file(make_tokenizer(8000)), hidden_size=hidden, layers=layers, context=1024)
    if not os.path.exists(data):
        maker = TextMaker(seed=3)
        rows = [{"instruction": maker.text(maker.length(median=150, cap=600)) + "?",
                 "response": maker.text(maker.length(median=1200, cap=3000))} for _ in range(512)]
        pq.write_table(pa.Table.from_pylist(rows), data)
    return model, data


def plain_loop(model_dir: str, data_path: str, steps: int, per_device: int, accum: int, lr: float) -> dict:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from training import data as tdata
    from training.train import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    ds, _ = tdata.build_dataset(tok, "forward", pq.read_table(data_path).to_pylist(), 1024)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    collate = tdata.PadCollator(tok.pad_token_id)
    order = torch.randperm(len(ds)).tolist()
    pos = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(accum):
            idx = [order[(pos + i) % len(ds)] for i in range(per_device)]
            pos += per_device
            loss = model(**collate([ds[i] for i in idx])).loss / accum
            loss.backward()
        opt.step()
        opt.zero_grad()
    wall = time.perf_counter() - t0
    return {"tokens": collate.tokens, "wall_s": round(wall, 2), "tokens_per_s": round(collate.tokens / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--per-device-batch-size", type=int, default=4)
    args = ap.parse_args()
    import torch

    from training import train

    model, data = build(args.hidden, args.layers)
    out = os.path.join(WORK, f"train-{args.hidden}x{args.layers}", "out")
    shutil.rmtree(out, ignore_errors=True)
    accum = args.batch_size // args.per_device_batch_size
    ours = train.run(train.TrainConfig(role="forward", base_model=model, data=data, output=out, max_steps=args.steps,
                                       lr=1e-4, batch_size=args.batch_size,
                                       per_device_batch_size=args.per_device_batch_size, logging_steps=10,
                                       bf16=torch.cuda.is_available()))["metrics"]
    peer = plain_loop(model, data, args.steps, args.per_device_batch_size, accum, 1e-4)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"device": device, "model": f"Llama hidden {args.hidden} x {args.layers} layers", "steps": args.steps,
              "batch": args.batch_size, "bft_train": {k: ours[k] for k in ("tokens", "wall_s", "tokens_per_s")},
              "plain_loop": peer, "ratio": round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)}
    json.dump(result, open(os.path.join(WORK, "train_bench.json"), "w"), indent=2)
    print(json.dumps(result, indent=2))
    print(f"\n| device | model | steps x batch | bft train tok/s | plain loop tok/s | ratio |\n|---|---|---|---|---|---|\n"
          f"| {device} | {result['model']} | {args.steps} x {args.batch_size} | {ours['tokens_per_s']:,} | "
          f"{peer['tokens_per_s']:,} | {result['ratio']} |")


if __name__ == "__main__":
    main()

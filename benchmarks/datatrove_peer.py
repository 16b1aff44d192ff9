"""The peer of `bft prepare` in the benchmark: datatrove reading the same files, counting tokens with
the same tokenizer, filtering on the count and writing Parquet (2 local workers)."""
import argparse
import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.tokens import TokensCounter  # noqa: E402
from datatrove.pipeline.writers import ParquetWriter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-dir", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-tokens", type=int, default=3584)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    limit = args.max_tokens
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(args.input_dir, glob_pattern="*.json.gz", compression="gzip"),
            TokensCounter(tokenizer_name_or_path=args.tokenizer),
            LambdaFilter(lambda doc: doc.metadata["token_count"] <= limit),
            ParquetWriter(args.output),
        ],
        tasks=args.tasks, workers=args.workers, logging_dir=args.output + "-logs",
    ).run()


if __name__ == "__main__":
    main()

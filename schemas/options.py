"""Declaring a verb's options: a config dataclass field with its help text, read by `bft.config`
(which makes the flag, the run-file key, the --help line and the type check from it)."""
from __future__ import annotations

from dataclasses import asdict, field, fields


def option(default, help_text: str, **meta):
    """A field with a default. meta: choices=[...], flag="--name", comma=True (a comma-separated list on
    the command line), run_only=True (changes how the verb runs, not what it produces)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text, **meta})
    return field(default=default, metadata={"help": help_text, **meta})


def required(help_text: str, **meta):
    """A field the user must give (flag or run file)."""
    return field(metadata={"help": help_text, **meta})


def product_options(cfg) -> dict:
    """The options of a config dataclass that shape what the verb produces (all but run_only ones)."""
    values = asdict(cfg)
    return {f.name: values[f.name] for f in fields(cfg) if not f.metadata.get("run_only")}

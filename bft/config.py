"""The one config loader: YAML sections and command-line flags onto each verb's config dataclass.

A verb's options are the fields of its config dataclass, and nothing else: the default is written
once, on the field; `metadata={"help": ..., "choices": [...], "flag": "--name", "comma": True}` adds
the help text, the allowed values, a flag name other than the field's, and a list given on the
command line as comma-separated values. From the fields come both the argparse flags (`--max-tokens`
for `max_tokens`, defaults shown in --help) and the keys of the verb's section in a run file:

    root: gs://bucket/runs/nightly          # every verb that takes --root
    prepare:  {input: [...], tokenizer: ..., max_tokens: 3584, beam_args: ["--runner=DataflowRunner"]}
    generate:
      batch_size: 32                        # every stage
      score: {engine: openai, model: forward-7b, base_url: http://gpu:8000/v1}
    assemble: {recipe: filter+rewrite, seed_data: ...}

Precedence: flags > the verb's section (for generate: the stage's keys over the shared ones) > the
top-level `root` > the field's default. A key the verb does not know, or a value of the wrong type,
is an error naming the file, the section the key was written in and the key; an unknown name (a
section, a stage, a key) is shown with the known ones and the closest of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from typing import Any

import storage
from schemas.errors import UserError
from schemas.recipes import STAGES

STAGE_SECTIONS = STAGES  # schemas.recipes: the one list of stages


class ConfigError(UserError):
    """A run file or a flag value is not what the verb takes."""


@dataclasses.dataclass(frozen=True)
class Option:
    name: str                # the field, and the key in a run file
    flag: str                # the command-line flag
    kind: type               # int, float, str, bool or list
    optional: bool           # None is allowed
    default: Any             # dataclasses.MISSING when required
    help: str
    choices: tuple | None
    comma: bool

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def options(cls) -> list[Option]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal"):
            continue
        kind, optional = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        choices = f.metadata.get("choices")
        out.append(Option(f.name, f.metadata.get("flag", "--" + f.name.replace("_", "-")), kind, optional, default,
                          f.metadata.get("help", ""), tuple(choices) if choices else None,
                          bool(f.metadata.get("comma"))))
    return out


def _kind(hint, where: str) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        kind, _ = _kind(inner[0], where)
        return kind, True
    if typing.get_origin(hint) is list or hint is list:
        return list, False
    if hint in (int, float, str, bool):
        return hint, False
    raise TypeError(f"{where}: unsupported option type {hint}")


def add_arguments(ap: argparse.ArgumentParser, cls, positional: tuple[str, ...] = ()) -> None:
    """One flag per option; defaults are SUPPRESSed so that only what the user typed is returned
    (the default comes from the dataclass, after the run file)."""
    for opt in options(cls):
        shown = "" if opt.required or opt.default is None or opt.default is False or opt.default in ([], "") else f" (default: {_show(opt.default)})"
        # argparse formats help with %: a literal % in a help text or a default must be doubled
        kw: dict[str, Any] = {"help": (opt.help + shown).strip().replace("%", "%%") or None,
                              "default": argparse.SUPPRESS}
        if opt.name in positional:
            ap.add_argument(opt.name, choices=opt.choices, help=kw["help"], default=argparse.SUPPRESS,
                            nargs=None if opt.required else "?")
            continue
        if opt.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction if opt.default is True else "store_true"
        elif opt.kind is list:
            if opt.comma:
                kw.update(type=_comma_list, metavar="A,B")
            else:
                kw.update(action="append", metavar=opt.name.upper().rstrip("S"))
        else:
            kw.update(type=opt.kind, choices=opt.choices, metavar=None if opt.choices else opt.name.upper())
        if opt.required:
            kw["help"] = (kw["help"] or "") + " (required, here or in --config)"
        ap.add_argument(opt.flag, dest=opt.name, **kw)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _comma_list(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


RUN_FILE_LIMIT = 16 * storage.MiB   # a run file is a few dozen keys; one past this is no run file


def read_run_file(path: str) -> dict:
    """A run file (YAML or JSON) as a mapping; errors name the file."""
    try:
        text = storage.read_input(path, RUN_FILE_LIMIT, "a run file").decode("utf-8")
    except storage.NotAnInput as e:
        raise ConfigError(str(e)) from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from e
    try:
        if path.endswith(".json"):
            doc = json.loads(text)
        else:
            doc = _load_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both name the line
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML/JSON{where} ({problem})") from e
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file holds a mapping (root:, prepare:, generate:, assemble:, ...)")
    return doc


# A run file is a few dozen keys; YAML's anchors and aliases share one node between places, so a few
# hundred bytes can name 10^9 values (the "billion laughs"). Its size counted with every alias expanded
# is bounded before any value is built, and no error message prints more than a short repr of a value.
MAX_YAML_NODES = 100_000


def _load_yaml(text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            expanded = _expanded_size(node)
            if expanded > MAX_YAML_NODES:
                raise ConfigError(f"its anchors and aliases expand to more than {MAX_YAML_NODES:,} values "
                                  "(an alias bomb?); write the values out")
            return node

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _expanded_size(root) -> int:
    """The number of nodes of a composed YAML document with every alias expanded, memoized per node
    (aliases make it a DAG): linear in the document's size, whatever the expansion."""
    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = ([n for pair in node.value for n in pair] if node.id == "mapping"
                    else list(node.value) if node.id == "sequence" else [])
        if done or not children:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_YAML_NODES:  # stop counting: the answer is already "too many"
                return size[id(node)]
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)]


def _brief(value, limit: int = 80) -> str:
    """A value as an error message shows it: a repr of bounded depth, width and length (a run file's
    value may be huge, or an alias bomb's shared lists)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 4, 4, 40, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# A run file's top-level keys: `root` and a section per verb (bft.cli's VERBS; `eval` holds its two).
SECTIONS = ("root", "prepare", "generate", "assemble", "validate", "latest", "diff", "show", "seed", "train", "eval", "rebuild",
            "plan", "status")
SUB_SECTIONS = {"generate": STAGE_SECTIONS, "eval": ("generate", "judge")}
SUB_KIND = {"generate": "stage", "eval": "verb"}


def unknown(kind: str, name, known) -> str:
    """The words for a name a run file or a flag may not hold: the known names, and the closest one."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=1)
    return (f"unknown {kind} {_brief(name, 40)} (known: {', '.join(known)}"
            + (f"; did you mean {close[0]!r}?)" if close else ")"))


def check_sections(doc: dict, path: str) -> None:
    """A top-level key that is neither `root` nor a verb's section is an error naming it."""
    for key in doc:
        if key not in SECTIONS:
            raise ConfigError(f"{path}: {unknown('section', key, SECTIONS)}")


def section_parts(doc: dict, path: str, verb: str, sub: str | None = None) -> list[tuple[str, dict]]:
    """The parts of a run file a verb reads, each with the name of the section it was written in:
    `root`, then the verb's section; for a verb with sub-sections (generate: one per stage; eval:
    generate, judge), the shared keys and then the sub-section's own (later parts win)."""
    parts = [("root", {"root": doc["root"]})] if "root" in doc else []
    body = doc.get(verb) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section {verb!r} must be a mapping of option names to values")
    subs = SUB_SECTIONS.get(verb, ())
    _no_root(body, path, verb)
    parts.append((verb, {k: v for k, v in body.items() if k not in subs}))
    if sub is not None:
        own = body.get(sub) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{path}: section {verb}.{sub} must be a mapping of option names to values")
        _no_root(own, path, f"{verb}.{sub}")
        parts.append((f"{verb}.{sub}", own))
    return parts


def section(doc: dict, path: str, verb: str, sub: str | None = None) -> dict:
    """The keys a verb reads from a run file (section_parts), merged."""
    return {k: v for _, part in section_parts(doc, path, verb, sub) for k, v in part.items()}


def _no_root(body: dict, path: str, where: str) -> None:
    """One root per run: a `root` inside a verb's section would make that verb (and the plan) work on
    another root than the others (and than --root), so it is refused."""
    if "root" in body:
        raise ConfigError(f"{path}: key 'root' in section {where}: a run has one root, the top-level `root:` "
                          "(or --root); move it there")


# Keys a section may hold beside the verb's own options, with their types: Beam's pipeline options for
# the Beam verbs, and what `bft rebuild` / `bft plan` read from a generation stage's section.
RUN_KEYS = {"prepare": {"beam_args": list}, "assemble": {"beam_args": list},
            "generate": {"external": bool, "workers": int, "tokens_per_s": float,
                         "price_in": float, "price_out": float, "batch_discount": float}}


def section_values(cls, doc: dict, path: str, verb: str, sub: str | None = None) -> tuple[dict, dict, str]:
    """(the verb's option values, its RUN_KEYS values, where) from a parsed run file, every key and
    type checked and an unknown one named with the section it was written in: a top-level key, a key
    of the verb's section (a mapping there: a sub-section of an unknown name), a sub-section's key
    (for generate, every stage's, since they share the options); `beam_args` must be flags that Beam's
    PipelineOptions knows."""
    check_sections(doc, path)
    run_types = RUN_KEYS.get(verb, {})
    names = {o.name for o in options(cls)} | set(run_types)
    subs = SUB_SECTIONS.get(verb, ())
    body = doc.get(verb) if isinstance(doc.get(verb), dict) else {}
    for key, value in body.items() if subs else ():
        if key not in subs and str(key).replace("-", "_") not in names and (value is None or isinstance(value, dict)):
            raise ConfigError(f"{path}: {verb}: {unknown(SUB_KIND[verb], key, subs)}")
    if verb == "generate":  # every stage takes GenerateConfig's options: a typo in another stage is found too
        for other in subs:
            if other != sub and isinstance(body.get(other), dict):
                check_values(cls, body[other], f"{path}: {verb}.{other}", allowed_extra=tuple(run_types))
    values, run = {}, {}
    for label, part in section_parts(doc, path, verb, sub):
        if label == "root" and "root" not in names:
            continue  # `root:` applies to the verbs that take one
        checked = check_values(cls, part, f"{path}: {label}", allowed_extra=tuple(run_types))
        for key, kind in run_types.items():
            if key in checked:
                option = Option(key, key, kind, False, dataclasses.MISSING, "", None, False)
                run[key] = _coerce(option, checked.pop(key), f"{path}: {label}: key {key!r}")
        values.update(checked)
    where = f"{path} (section {verb}{'.' + sub if sub else ''})"
    if run.get("beam_args"):
        from beam_pipelines.runtime.options import unknown_beam_flags

        flags = unknown_beam_flags(run["beam_args"])
        if flags:
            raise ConfigError(f"{where}: beam_args {', '.join(flags)} are not Beam pipeline options")
    return values, run, where


def check_values(cls, values: dict, where: str, allowed_extra: tuple[str, ...] = ()) -> dict:
    """Values from a run file, checked against the verb's options: an unknown key or a wrong type is
    an error naming the key and `where`."""
    by_name = {o.name: o for o in options(cls)}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in allowed_extra:
            out[name] = value
            continue
        opt = by_name.get(name)
        if opt is None:
            raise ConfigError(f"{where}: {unknown('key', key, sorted({*by_name, *allowed_extra}))}")
        out[name] = _coerce(opt, value, f"{where}: key {key!r}")
    return out


def _coerce(opt: Option, value, where: str):
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    kind = opt.kind
    if kind is list:
        if isinstance(value, str):
            value = _comma_list(value) if opt.comma else [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ConfigError(f"{where} must be a list of strings, not {_brief(value)}")
        return [str(v) for v in value]
    ok = (isinstance(value, bool) if kind is bool
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, str))
    if not ok:
        raise ConfigError(f"{where} must be {kind.__name__}, not {type(value).__name__} ({_brief(value)})")
    value = float(value) if kind is float else value
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, opt.choices))}, not {_brief(value)}")
    return value


def build(cls, file_values: dict, flag_values: dict, where: str):
    """The verb's config: defaults < file values < flags. A missing required option is an error."""
    values = {**file_values, **flag_values}
    missing = [o for o in options(cls) if o.required and o.name not in values]
    if missing:
        names = ", ".join(f"{o.flag} (key {o.name})" for o in missing)
        raise ConfigError(f"missing required option(s): {names}" + (f" in {where}" if where else ""))
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    check = getattr(cfg, "check", None)
    if check:
        check()
    return cfg

"""The command line as a user meets it: one config loader, flags that no one knows are errors, user
mistakes are one line and exit 1, a run file's section per verb."""
from __future__ import annotations

import json
import os
import re

import pytest

from bft import cli, config
from beam_pipelines.prepare import PrepareConfig
from generation.job import GenerateConfig
from tests.conftest import LOCAL, dolma_line, write_dolma_file
from tests.helpers.cli import run


@pytest.fixture
def dolma(tmp_path, fixture_texts):
    write_dolma_file(str(tmp_path / "d" / "cc_en_head" / "a.json.gz"),
                     [dolma_line(f"d{i}", fixture_texts[i]) for i in range(12)])
    return str(tmp_path / "d" / "*" / "*.json.gz")


def test_help_and_version_go_to_stdout(capsys):
    rc, out, err = run(capsys, "--help")
    assert rc == 0 and "prepare" in out and "eval judge" in out and not err
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.startswith("bft ")
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 3520)" in out and "(default: 16)" in out and "(default: 0)" in out  # defaults shown


@pytest.mark.parametrize("verb", ["prepare", "generate", "generate backtranslate", "generate score",
                                  "generate rewrite", "generate distill", "generate rate", "assemble", "validate", "latest",
                                  "seed", "train", "eval generate", "eval judge", "rebuild", "plan", "status"])
def test_every_verb_and_stage_has_help(capsys, verb):
    """Each verb's --help prints its options (a help text with a literal % once crashed argparse)."""
    with pytest.raises(SystemExit) as e:
        cli.main(verb.split() + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: bft ") and "--config FILE" in out


@pytest.mark.parametrize("verb, codes", [("rebuild", (0, 1, 2, 75, 130, 143)), ("generate", (0, 1, 2, 75, 130, 143)),
                                         ("prepare", (0, 1, 2, 130, 143)), ("assemble", (0, 1, 2, 130, 143))])
def test_the_verbs_a_scheduler_runs_list_their_exit_statuses_in_help(capsys, verb, codes):
    """No exit codes in `bft rebuild --help`; a scheduler's author needs 75 (wait) and 130 apart."""
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    listed = help_text[help_text.index("exit status: "):]
    assert [int(c) for c in re.findall(r"(?:: |; )(\d+) ", listed)] == list(codes), listed
    assert "75 EX_TEMPFAIL: waiting for external workers or batches" in listed or 75 not in codes
    assert "130 interrupted (Ctrl-C, SIGINT)" in listed and "1 failed: one line on stderr says why" in listed


@pytest.mark.parametrize("verb", ["prepare", "assemble", "rebuild", "plan", "generate", "latest", "train"])
def test_verbose_and_quiet_say_what_they_do_on_each_verb(capsys, verb):
    """--quiet's help names no internal module, and --verbose's says "Beam's logs" only on verbs that
    run a Beam pipeline."""
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    verbose = out[out.index("--verbose "):out.index("--quiet ")]
    assert ("Beam" in verbose) == (verb in ("prepare", "assemble", "rebuild")), verbose
    quiet = out[out.index("--quiet "):].split(" --")[0]
    assert "progress" in quiet and "schemas." not in quiet, quiet


@pytest.mark.parametrize("verb", ["rebuild", "plan"])
def test_an_error_names_its_verb_once(capsys, verb):
    """Not "bft rebuild: bft rebuild needs --config": the verb once, then what to give."""
    rc, _, err = run(capsys, verb)
    assert rc == 1 and err == f"bft {verb}: needs --config FILE (the run file)\n"


def test_bft_latest_takes_the_root_of_a_run_file(published, tmp_path, capsys):
    """`bft latest --config FILE` reads the root from the run file, as --help says (it once said "give a run
    root")."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"root: {published}\n")
    rc, out, err = run(capsys, "latest", "--config", str(run_file))
    assert rc == 0 and out == os.path.join(published, "sft", "v1", "data") + "\n", err
    rc, out, _ = run(capsys, "latest", "--root", published)
    assert rc == 0 and out == os.path.join(published, "sft", "v1", "data") + "\n"


def test_a_run_files_sections_are_the_verbs():
    """bft.config's SECTIONS (the top-level keys a run file may hold) are `root` and the verbs' heads."""
    assert set(config.SECTIONS) == {"root"} | {v.name.split()[0] for v in cli.VERBS.values()}


def test_bft_eval_alone_lists_its_sub_verbs(capsys):
    """`bft eval --help` lists judge and generate (it once said "unknown verb 'eval'")."""
    rc, out, err = run(capsys, "eval", "--help")
    assert rc == 0 and out.startswith("usage: bft eval {generate,judge}") and "eval judge" in out and not err
    rc, out, err = run(capsys, "eval")
    assert rc == 2 and "eval generate" in err and not out


def test_an_unknown_verb_is_a_usage_error(capsys):
    rc, _, err = run(capsys, "prepair")
    assert rc == 2 and "unknown verb 'prepair'" in err


@pytest.mark.parametrize("argv", [
    ["prepare", "--input", "x", "--root", "r", "--tokenizer", "t", "--maxtokens", "64"],
    ["assemble", "--root", "r", "--recipie", "filter"],
    ["generate", "score", "--root", "r", "--engine", "hf", "--model", "m", "--temprature", "0.5"],
    ["prepare", "--input", "x", "--root", "r", "--tokenizer", "t", "--max", "64"],  # no abbreviations
])
def test_a_flag_that_neither_bft_nor_beam_knows_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "unknown option" in err


def test_beam_flags_pass_through(tmp_path, dolma, bpe_tokenizer_path, capsys):
    rc, out, err = run(capsys, "prepare", "--input", dolma, "--root", str(tmp_path / "r"), "--tokenizer",
                       bpe_tokenizer_path, "--num-shards", "2", "--runner=FnApiRunner", "--direct_num_workers", "1")
    assert rc == 0, err
    assert "12 input records -> 12 candidates" in out
    # the documents that fit by their upper bound are not counted, and the line says so
    assert re.search(r"2 shards, [\d,]+ tokens in 0 counted documents \(12 kept uncounted\), balance max/mean "
                     r"[\d.]+ \(by utf8_bytes\)", out), out


@pytest.mark.parametrize("argv, message", [
    (["--num-shards", "0"], "--num-shards, --reject-shards and --batch-docs must be >= 1"),
    (["--min-tokens", "900", "--max-tokens", "100"], "--min-tokens 900 is larger than --max-tokens 100"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "--tokenizer '/nonexistent/tokenizer.json': cannot load it"),
])
def test_user_errors_are_one_line_and_exit_1(tmp_path, dolma, bpe_tokenizer_path, capsys, argv, message):
    base = {"--input": dolma, "--root": str(tmp_path / "r"), "--tokenizer": bpe_tokenizer_path}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    rc, _, err = run(capsys, "prepare", *[x for kv in base.items() for x in kv], *LOCAL)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_glob_that_matches_nothing_and_steps_out_of_order_are_one_line(tmp_path, bpe_tokenizer_path, capsys):
    rc, _, err = run(capsys, "prepare", "--input", str(tmp_path / "none" / "*.gz"), "--root", str(tmp_path / "r"),
                     "--tokenizer", bpe_tokenizer_path, *LOCAL)
    assert rc == 1 and "matches no file" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "generate", "score", "--root", str(tmp_path / "empty"), "--engine", "hf", "--model", "m")
    assert rc == 1 and "run bft prepare first" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "assemble", "--root", str(tmp_path / "empty"), *LOCAL)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err


def test_a_rerun_with_another_config_names_the_keys_that_differ(tmp_path, dolma, bpe_tokenizer_path, capsys):
    args = ["prepare", "--input", dolma, "--root", str(tmp_path / "r"), "--tokenizer", bpe_tokenizer_path, *LOCAL]
    assert run(capsys, *args, "--num-shards", "2")[0] == 0
    rc, out, _ = run(capsys, *args, "--num-shards", "2")
    assert rc == 0 and "complete with this config; nothing to do" in out
    rc, _, err = run(capsys, *args, "--num-shards", "3", "--max-tokens", "500")
    assert rc == 1 and "max_tokens: 3520 -> 500" in err and "num_shards: 2 -> 3" in err and "--overwrite" in err
    rc, out, _ = run(capsys, *args, "--num-shards", "3", "--overwrite")
    assert rc == 0 and "3 shards" in out
    names = sorted(os.listdir(tmp_path / "r" / "candidates"))
    assert [n for n in names if n.startswith("candidates-")] == [f"candidates-0000{k}-of-00003.parquet" for k in range(3)]


def test_recorded_paths_are_absolute(tmp_path, dolma, bpe_tokenizer_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "prepare", "--input", os.path.relpath(dolma, tmp_path), "--root", "r", "--tokenizer",
                     bpe_tokenizer_path, "--num-shards", "2", *LOCAL)
    assert rc == 0, err
    stats = json.loads((tmp_path / "r" / "candidates" / "stats.json").read_text())
    assert stats["root"] == str(tmp_path / "r")
    assert all(os.path.isabs(p) for p in stats["config"]["input"])
    assert all(os.path.isabs(f["path"]) for f in stats["shards"]["files"])


def test_a_run_file_section_supplies_options_and_flags_win(tmp_path, dolma, bpe_tokenizer_path, capsys):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"root: {tmp_path / 'r'}\n"
                        f"prepare:\n  input: ['{dolma}']\n  tokenizer: {bpe_tokenizer_path}\n  num_shards: 3\n"
                        f"  beam_args: ['--runner=FnApiRunner']\n"
                        "generate:\n  batch_size: 4\n  score: {engine: hf, model: m, max_new_tokens: 7}\n")
    rc, out, err = run(capsys, "prepare", "--config", str(run_file), "--num-shards", "2")
    assert rc == 0, err
    assert "2 shards" in out
    cls_values = config.section(config.read_run_file(str(run_file)), str(run_file), "generate", "score")
    cfg = config.build(GenerateConfig, config.check_values(GenerateConfig, cls_values, "f"), {"stage": "score"}, "f")
    assert (cfg.batch_size, cfg.max_new_tokens, cfg.engine, cfg.root) == (4, 7, "hf", str(tmp_path / "r"))


@pytest.mark.parametrize("text, message", [
    ("prepare:\n  max_tokenz: 5\n", "prepare: unknown key 'max_tokenz' (known: "),
    ("prepare:\n  max_tokenz: 5\n", "did you mean 'max_tokens'?)"),
    ("prepare: {}\nasemble: {}\n", "unknown section 'asemble' (known: root, prepare, "),
    ("prepare:\n  max_tokens: lots\n", "key 'max_tokens' must be int, not str"),
    ("prepare:\n  splits: 5\n", "key 'splits' must be a list of strings"),
    ("prepare:\n  beam_args: ['--maxtokens=5']\n", "beam_args --maxtokens are not Beam pipeline options"),
    ("prepare: [1, 2]\n", "section 'prepare' must be a mapping"),
    ("- a\n- b\n", "a config file holds a mapping"),
    ("prepare: {input: [x]\n", "not valid YAML/JSON"),
    ("prepare:\n  num_shards: 2\n", "missing required option(s): --input (key input), --root (key root), "
                                    "--tokenizer (key tokenizer)"),
])
def test_run_file_errors_name_the_key_and_the_file(tmp_path, capsys, text, message):
    run_file = tmp_path / "bad.yaml"
    run_file.write_text(text)
    rc, _, err = run(capsys, "prepare", "--config", str(run_file))
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
    if "key" in message:
        assert str(run_file) in err


def _alias_bomb(levels: int) -> str:
    """`max_tokens: [&l0 [9 strings], &l1 [9 x *l0], ...]`: 9^levels values in a few hundred bytes."""
    parts = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "prepare:\n  max_tokens: [" + ", ".join(parts) + "]\n"


def test_a_yaml_alias_bomb_is_refused_at_once_and_no_error_prints_a_huge_value(tmp_path, capsys):
    """9 levels of 9 aliases name 9^9 (387M) values in ~500 bytes; `bft plan` held
    1.4 GB after 120 s formatting one with !r. Refused before any value is built, in one line."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(9))
    assert len(bomb.read_bytes()) < 1000
    for verb in ("plan", "prepare"):
        rc, _, err = run(capsys, verb, "--config", str(bomb))
        assert rc == 1 and "anchors and aliases expand to more than 100,000 values" in err, err
        assert len(err.strip().splitlines()) == 1 and str(bomb) in err
    # Under the bound the run file loads, and the wrong-type message shows a short value, not 9^4 strings
    small = tmp_path / "small.yaml"
    small.write_text(_alias_bomb(4))
    rc, _, err = run(capsys, "prepare", "--config", str(small))
    assert rc == 1 and "key 'max_tokens' must be int, not list ([['lol', 'lol'" in err and len(err) < 400, err
    # An anchor used the ordinary way (defaults shared between stages) is fine
    shared = tmp_path / "shared.yaml"
    shared.write_text("root: /tmp/r\ngenerate:\n  backtranslate: &d {batch_size: 4}\n  score: *d\n")
    assert config.read_run_file(str(shared))["generate"]["score"] == {"batch_size": 4}


def test_every_verb_declares_its_options_once():
    for verb in cli.VERBS.values():
        opts = config.options(verb.config_class())
        assert len({o.flag for o in opts}) == len(opts), verb.name
        assert all(o.help for o in opts), [o.name for o in opts if not o.help]
    assert {o.name for o in config.options(PrepareConfig)} >= {"input", "root", "tokenizer", "max_tokens"}


def test_a_user_error_raised_in_a_beam_worker_is_one_line():
    text = ("Pipeline failed: Traceback (most recent call last):\n  File x\n"
            "beam_pipelines.prepare.UnreadableFileError: /d/a.json.gz: unreadable after 3 lines "
            "(EOFError: eof) [while running 'ReadAndMeasure']\n")
    assert cli.user_error_message(RuntimeError(text)) == "/d/a.json.gz: unreadable after 3 lines (EOFError: eof)"
    assert cli.user_error_message(RuntimeError("ZeroDivisionError: bug")) is None


@pytest.mark.parametrize("reader", ["run file", "template", "seed data", "oasst"])
@pytest.mark.parametrize("kind", ["link-to-dev-zero", "fifo", "folder"])
def test_a_file_the_user_names_is_read_only_when_it_is_a_regular_file(tmp_path, reader, kind):
    """Every file the user names (run files, templates, seed data) is opened only when
    it is a regular file: a link to /dev/zero is never read, a FIFO never waited on, a folder is one line."""
    from beam_pipelines.assemble.seed import read_seed_table
    from generation.templates import load_template
    from schemas.errors import user_error_message
    from training.seed import read_messages

    path = tmp_path / "named.jsonl"
    if kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    read = {"run file": config.read_run_file, "template": lambda p: load_template("score", p),
            "seed data": read_seed_table, "oasst": read_messages}[reader]
    with pytest.raises(Exception) as e:
        read(str(path))
    why = {"link-to-dev-zero": "a device", "fifo": "a FIFO", "folder": "a folder"}[kind]
    assert user_error_message(e.value).startswith(f"{path}: {why}, not a regular file")


def test_a_run_file_over_its_size_limit_is_one_line(tmp_path, monkeypatch, capsys):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("root: /r\n" + "# padding\n" * 10)
    monkeypatch.setattr(config, "RUN_FILE_LIMIT", 64)
    rc, _, err = run(capsys, "plan", "--config", str(run_file))
    assert rc == 1 and f"{run_file}: 109 bytes, over the 64-byte limit of a run file" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, status", [(["--version"], 0), (["nosuchverb"], 2), (["prepare", "--nosuchflag"], 2)])
def test_the_bft_command_ends_at_once_with_its_status_after_its_threads_and_exit_functions(argv, status):
    """`bft` (cli.entry) skips the interpreter's teardown, not what an exit must do: threading's exit
    hooks (a pool's idle thread, which a bare join of the non-daemon threads waited on forever) and the
    atexit functions run, the streams are flushed; the status is main's (argparse's usage error: 2)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = ("import atexit, concurrent.futures, sys\nfrom bft import cli\n"
              "pool = concurrent.futures.ThreadPoolExecutor(1)\npool.submit(int).result()\n"
              "atexit.register(lambda: print('exit function ran'))\nsys.argv = ['bft', *sys.argv[1:]]\ncli.entry()\n")
    out = subprocess.run([sys.executable, "-c", script, *argv], env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == status, out.stderr
    assert out.stdout.splitlines()[-1] == "exit function ran"

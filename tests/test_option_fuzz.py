"""Option fuzz: hypothesis draws option combinations and values (valid, boundary, invalid) for
every command, reading the options from the click commands themselves, so an option or a command
added later is fuzzed without touching this file (a new command only needs its arguments below).

Accepted outcomes: success with verified output, or a one-line error with nothing written.
`serve`, the full `bench` and `eval` are fuzzed for option errors only: their work is replaced by
a stub once the command has checked what it can (bench runs its own pre-flight check first).

CI runs a derandomised slice; `LYNX_FUZZ_EXAMPLES=N` multiplies the counts for a campaign, and
`LYNX_FUZZ_REPORT=FILE` writes the outcomes and kinds of refusal (docs/SECURITY.md records one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_export.cli import _common, main

SCALE = int(os.environ.get("LYNX_FUZZ_EXAMPLES", "1"))
# Examples per command in CI; the cheap commands get more.
EXAMPLES = {"build": 24, "inspect": 8, "demo-model": 3, "dense-twin": 5, "bench": 16, "eval": 8, "trace": 5, "replay": 12,
            "triton": 16, "serve": 8, "bench-serve": 12}
STUBBED = {"bench", "eval", "serve", "bench-serve"}

# Arguments and output options each command gets fixed ({work}: a fresh folder per example).
ARGUMENTS = {
    "build": ["{model}", "-o", "{work}/out"],
    "inspect": ["{model}"],
    "demo-model": ["{work}/out.onnx"],
    "dense-twin": ["{model}", "{work}/out.onnx"],
    "bench": ["--out", "{work}/out"],
    "eval": ["--out", "{work}/out"],
    "trace": ["-o", "{work}/out.npz"],
    "replay": ["{trace}"],
    "triton": ["{build}", "--repo", "{work}/out"],
    "serve": ["{work}/dir"],
    "bench-serve": ["--out", "{work}/out"],
}
FIXED = {"out_dir", "out", "repo", "help"}

# Valid values of the options whose size drives the cost of a successful run: small ones, so
# that a success stays cheap. Out-of-range values are still drawn from the option's own type.
_small = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda xs: ",".join(map(str, xs)))
CHEAP = {
    ("build", "batch_sizes"): _small,
    ("build", "seq_lens"): _small,
    ("build", "max_batch"): st.integers(1, 64).map(str),
    ("build", "max_sequence"): st.integers(2, 64).map(str),
    ("demo-model", "layers"): st.integers(1, 2).map(str),
    ("trace", "sequences"): st.integers(1, 8).map(str),
    ("trace", "seq_len"): st.integers(2, 16).map(str),
    ("replay", "batch_sizes"): _small,
}
PATHS = ["{work}/new", "{work}/file", "{work}/dir", "{work}/missing/x"]
STRINGS = ["8.0", "8.6", "9.0", "", "lynx_moe", "m-1", "../x", "a b", "\u00e9", "x" * 70]


OUTCOMES: dict[str, dict[str, int]] = {}  # per command: outcome -> examples, for the campaign's record
ERRORS: dict[str, int] = {}


def _tally(command: str, outcome: str, message: str = "") -> None:
    counts = OUTCOMES.setdefault(command, {})
    counts[outcome] = counts.get(outcome, 0) + 1
    if message:  # the kind of refusal: the message up to its first value
        kind = f"{command}: {message.split('error: ', 1)[-1][:48]}"
        ERRORS[kind] = ERRORS.get(kind, 0) + 1
    if os.environ.get("LYNX_FUZZ_REPORT"):
        pathlib.Path(os.environ["LYNX_FUZZ_REPORT"]).write_text(json.dumps({"outcomes": OUTCOMES, "errors": ERRORS}, indent=2, sort_keys=True) + "\n")


class Reached(Exception):
    """The stub of a command's work: its options passed every check made before the work."""


def _ints(cmd: str, param: click.Parameter, low: int, high: int) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    valid = CHEAP.get((cmd, param.name), st.one_of(st.integers(low, min(high, low + 4)).map(str), st.sampled_from([str(low), str(high)])))
    return valid, st.sampled_from([str(v) for v in (low - 1, high + 1, 10**20, -(10**20))] + ["x", "1.5", ""])


def _value(cmd: str, param: click.Option) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(valid, invalid) values of an option's type; valid ones include the range's ends."""
    t = param.type
    if isinstance(t, click.Choice):
        return st.sampled_from(list(map(str, t.choices))), st.sampled_from(["nope", ""])
    if isinstance(t, _common.IntList):
        valid = CHEAP.get((cmd, param.name), st.lists(st.integers(t.min, t.min + 4), min_size=1, max_size=3).map(lambda xs: ",".join(map(str, xs))))
        return valid, st.sampled_from(["", "x", str(t.min - 1), str(t.max + 1), "1,,2", "1;2", "1e3", str(10**20)])
    if isinstance(t, _common.ChoiceList):
        return (st.lists(st.sampled_from(t.choices), max_size=3).map(",".join),
                st.lists(st.sampled_from([*t.choices, "nope"]), min_size=1, max_size=3).filter(lambda xs: "nope" in xs).map(",".join))
    if isinstance(t, click.IntRange):
        return _ints(cmd, param, t.min if t.min is not None else -(2**31), t.max if t.max is not None else 2**31)
    if isinstance(t, _common.Float32):
        low = t.min if t.min is not None else -1e6
        return (st.floats(low, t.max or 1e6, exclude_min=t.min_open).map(repr),
                st.sampled_from(["nan", "inf", "-inf", "1e-50", "1e39", "-1", "x"]))
    if isinstance(t, click.Path):
        return st.sampled_from(PATHS[:3]), st.sampled_from(PATHS)
    return st.sampled_from(STRINGS[:6]), st.sampled_from(STRINGS)


def values(cmd: str, param: click.Option) -> st.SearchStrategy[list[str]]:
    """argv tokens for one option, valid three times in four so that combinations get tried."""
    flag = param.opts[0]
    if param.is_flag:
        return st.sampled_from([[flag], *[[o] for o in param.secondary_opts]])
    valid, invalid = _value(cmd, param)
    value = st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else invalid)
    if param.multiple:
        return st.lists(value, min_size=1, max_size=2).map(lambda vs: [tok for v in vs for tok in (flag, v)])
    return value.map(lambda v: [flag, v])


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its content (folders: '')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def stubbed(command: str, work: pathlib.Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # relative default folders land in `work`
        if command == "bench":
            from lynx_export.bench import benchmark

            def run_bench(config, work_dir, **_):
                benchmark.check_config(config)
                raise Reached

            mp.setattr(benchmark, "run_bench", run_bench)
        elif command == "bench-serve":
            from lynx_export.bench import serving as serve_bench

            def run_serve_bench(config, work_dir, **_):
                serve_bench.check_config(config)
                raise Reached

            mp.setattr(serve_bench, "run_serve_bench", run_serve_bench)
        elif command == "eval":
            from lynx_export.evaluation import accuracy

            mp.setattr(accuracy, "run_accuracy", lambda *a, **k: (_ for _ in ()).throw(Reached()))
        elif command == "serve":
            from lynx_export.serving import server

            mp.setattr(server, "TritonServer", lambda *a, **k: (_ for _ in ()).throw(Reached()))
        yield


def check_success(command: str, argv: list[str], work: pathlib.Path, stdout: str) -> None:
    """What a successful run must have produced."""
    out = work / "out"
    if command == "build":
        report = json.loads((out / "report.json").read_text())
        assert report["passed"] is True and (out / "manifest.json").is_file() and (out / "model.ort.onnx").is_file()
        if "--triton-repo" in argv:
            repo = pathlib.Path(argv[argv.index("--triton-repo") + 1].format(work=work))
            assert list(repo.glob("*/config.pbtxt")), "build --triton-repo wrote no model"
    elif command in ("demo-model", "dense-twin"):
        import onnx

        onnx.checker.check_model(onnx.load(work / "out.onnx", load_external_data=False))
    elif command == "trace":
        from lynx_export.evaluation.trace import RouterTrace

        assert RouterTrace.load(work / "out.npz").shape[0] >= 1
    elif command == "triton":
        assert list(out.glob("*/config.pbtxt")) and (out / "README.md").is_file()
    elif command in ("inspect", "replay"):
        if "--json" in argv:
            assert json.loads(stdout)
        else:
            assert stdout.strip()
    else:
        raise AssertionError(f"{command} is stubbed: it cannot succeed")


@pytest.fixture(scope="module")
def fixtures(demo_onnx, tmp_path_factory) -> dict[str, pathlib.Path]:
    from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
    from lynx_export.compiler.verify import VerifyOptions
    from lynx_export.evaluation.trace import RouterTrace

    root = tmp_path_factory.mktemp("fuzz")
    trace = root / "trace.npz"
    logits = np.random.default_rng(0).standard_normal((2, 4, 6, 8)).astype(np.float32)
    RouterTrace(tuple(logits), top_k=2, source="fuzz").save(trace)
    built = build(demo_onnx, root / "build", BuildOptions(PolicyChoice("off"), verify=VerifyOptions(batch_sizes=(1,), seq_lens=(1,))))
    return {"model": demo_onnx, "trace": trace, "build": built.out_dir}


def _fuzz(command: str, fixtures: dict[str, pathlib.Path], tmp_path: pathlib.Path, data: st.DataObject) -> None:
    cmd = main.commands[command]
    options = [p for p in cmd.params if isinstance(p, click.Option) and p.name not in FIXED]
    chosen = data.draw(st.lists(st.sampled_from(options), unique_by=lambda p: p.name, max_size=4), label="options") if options else []
    argv = list(ARGUMENTS[command])
    for param in chosen:
        argv += data.draw(values(command, param), label=param.name)
    work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
    (work / "dir").mkdir(parents=True)
    (work / "dir" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (work / "file").write_text("not a model\n")
    argv = [a.format(work=work, **fixtures) for a in argv]
    before, inputs = snapshot(work), {k: snapshot(v.parent) for k, v in fixtures.items()}
    with stubbed(command, work):
        result = CliRunner().invoke(main, [command, *argv], prog_name="lynx-export")
    assert {k: snapshot(v.parent) for k, v in fixtures.items()} == inputs, f"{argv}: the inputs changed"
    if isinstance(result.exception, Reached):
        assert command in STUBBED and snapshot(work) == before, f"{argv}: wrote before its work"
        _tally(command, "options accepted (stubbed work)")
        return
    assert result.exception is None or isinstance(result.exception, SystemExit), (argv, result.exception)
    if result.exit_code == 0:
        check_success(command, argv, work, result.stdout)
        shutil.rmtree(work)
        _tally(command, "success, output checked")
        return
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[lynx-export]")]
    if lines and lines[0].split()[:3] == ["output", "batch", "seq"]:
        lines = lines[-1:]  # a failed verification's table of cases, above its one line
    assert result.exit_code in (1, 2, 3), (argv, result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("lynx-export") and "error:" in lines[0], (argv, result.stderr)
    assert snapshot(work) == before, f"{argv}: a failed run wrote files"
    shutil.rmtree(work)
    _tally(command, f"exit {result.exit_code}, one line, nothing written", lines[0])


def test_every_command_has_fuzz_arguments():
    assert set(main.commands) == set(ARGUMENTS) == set(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(ARGUMENTS))
def test_option_fuzz(command, fixtures, tmp_path):
    runs = settings(max_examples=EXAMPLES[command] * SCALE, deadline=None, database=None,
                    derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
    runs(given(data=st.data())(lambda data: _fuzz(command, fixtures, tmp_path, data)))()

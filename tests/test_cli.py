"""The command line as a user runs it: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import os
import pathlib

import onnx
import pytest

from tests.cli_builds import lynx



@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.onnx").write_bytes(b"")
    (d / "random.onnx").write_bytes(os.urandom(4096))
    (d / "text.onnx").write_text("this is not a model\n")
    good = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    (d / "no_nodes.onnx").write_bytes(good.SerializeToString())
    return {p.stem: p for p in d.iterdir()}


def test_help_lists_subcommands():
    """The installed command lists every subcommand, and each has help of its own: its usage line
    and the first line of its docstring."""
    from lynx_export.cli import main

    r = lynx("--help", process=True)  # the installed command itself
    assert r.returncode == 0 and main.commands
    listed = [line.split()[0] for line in r.stdout.split("Commands:", 1)[1].splitlines() if line.strip()]
    assert sorted(listed) == sorted(main.commands)
    for name, command in main.commands.items():
        own = lynx(name, "--help")
        assert own.returncode == 0 and own.stdout.startswith(f"Usage: lynx-export {name} "), (name, own.stdout)
        summary = " ".join(command.help.strip().splitlines()[0].split())
        assert summary and summary in " ".join(own.stdout.split()), name


def test_inspect_table(demo_onnx):
    r = lynx("inspect", demo_onnx)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["block", "E", "K", "H", "I"]
    assert lines[2].split()[:7] == ["layers.0.mlp", "8", "2", "64", "128", "swiglu", "softmax_topk"]


def test_inspect_json(demo_onnx):
    r = lynx("inspect", demo_onnx, "--json")
    assert r.returncode == 0, r.stderr
    blocks = json.loads(r.stdout)
    assert [b["name"] for b in blocks] == ["layers.0.mlp", "layers.1.mlp"]
    assert blocks[0] == {
        "name": "layers.0.mlp", "num_experts": 8, "top_k": 2, "hidden_size": 64, "expert_size": 128, "activation": "swiglu",
        "router": "softmax_topk", "normalize": True, "activation_alpha": 1.0, "activation_beta": 0.0,
        "swiglu_limit": None, "supported": True, "reason": "",
    }


@pytest.mark.parametrize(
    "name,message",
    [("empty", "empty file"), ("random", "not an ONNX model"), ("text", "not an ONNX model"), ("no_nodes", "no graph nodes")],
)
@pytest.mark.parametrize("command", ["inspect", "build"])
def test_bad_input_is_one_line_error(bad_inputs, tmp_path, command, name, message):
    args = [command, bad_inputs[name]] + (["-o", tmp_path / "out"] if command == "build" else [])
    r = lynx(*args)
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.errors) == 1, r.stderr
    assert r.errors[0].startswith("lynx-export: error: ") and message in r.errors[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["inspect", "build"])
def test_missing_file(tmp_path, command):
    args = [command, tmp_path / "nope.onnx"] + (["-o", tmp_path / "out"] if command == "build" else [])
    r = lynx(*args)
    assert r.returncode == 1
    assert r.errors == [f"lynx-export: error: {tmp_path / 'nope.onnx'}: no such file"]
    assert list(tmp_path.iterdir()) == []


def test_no_moe_blocks(dense_onnx, tmp_path):
    r = lynx("inspect", dense_onnx)
    assert r.returncode == 1 and "no MoE block found" in r.stderr
    r = lynx("build", dense_onnx, "-o", tmp_path / "out")
    assert r.returncode == 0 and r.errors == [] and "no MoE block to rewrite" in r.stderr and "compiles unchanged" in r.stderr
    assert (tmp_path / "out" / "model.ort.onnx").is_file()
    # Said plainly: no policy applied, nothing verified (no "verification: passed" over zero cases).
    assert r.stdout.splitlines()[0] == f"no block rewritten: {dense_onnx} compiles unchanged; no policy applies and nothing was verified"
    assert "verification" not in r.stdout and "policy:" not in r.stdout


def test_usage_errors_exit_2(demo_onnx, tmp_path):
    assert lynx("build", demo_onnx).returncode == 2  # -o missing
    assert lynx("build", demo_onnx, "-o", tmp_path / "o", "--policy", "nope").returncode == 2
    assert lynx("build", demo_onnx, "-o", tmp_path / "o", "--batch-sizes", "1,x").returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_build_prints_report_and_artifacts(demo_onnx, tmp_path):
    out = tmp_path / "engine"
    r = lynx("build", demo_onnx, "-o", out, "--batch-sizes", "1,8", "--seq-lens", "1,4")
    assert r.returncode == 0, r.stderr
    assert "policy: lynx (alpha=3.0, beta=1, tie_break=logit)" in r.stdout
    assert "verification: passed" in r.stdout
    assert str(out / "model.ort.onnx") in r.stdout
    # Progress goes to stderr, results to stdout.
    assert "[lynx-export]" in r.stderr and "[lynx-export]" not in r.stdout


def test_build_json(demo_onnx, tmp_path):
    r = lynx("build", demo_onnx, "-o", tmp_path / "engine", "--policy", "off", "--batch-sizes", "2", "--seq-lens", "1", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["manifest"]["policy"] == {"name": "off"}
    assert data["report"]["passed"] is True


@pytest.mark.slow
def test_demo_model_command(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "sub" / "demo.onnx"
    r = lynx("demo-model", out, "--layers", "1")
    assert r.returncode == 0, r.stderr
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["input_ids", "past_key.0", "past_value.0"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.onnx"]

"""scripts/gpu_check.py on a machine with no GPU: what can waste its one run on a GPU is checked here.

- `--dry-run` compiles (or finds the build up to date), plans and prints, with no GPU and no torch,
  and a relative `--out` is resolved before make runs in plugins/lynx_moe;
- `--device cpu` runs every section's own code against the fake-runtime library (no kernel runs,
  so the checks fail, but nothing may raise), and a budget that cannot be met truncates every section;
- results are written after each section, and a section that raises is recorded, not fatal;
- timing puts many calls between one pair of marks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import types

import pytest

from tests.test_plugin_build import PLUGIN, ROOT, core_build

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cwd=None, block_torch: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['torch'] = None; " if block_torch else "import sys; "
    code = prelude + f"import runpy; sys.argv = ['gpu_check.py', *{list(args)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_dry_run_with_a_relative_out_needs_no_gpu_and_no_torch(tmp_path):
    name = f"gpu-check-{time.monotonic_ns()}"
    build = tmp_path / name / "build"
    build.mkdir(parents=True)
    for artifact in ("lynx_moe.o", "liblynx_moe.so"):  # newer than the sources: make finds them up to date
        shutil.copy(core_build() / artifact, build / artifact)
    r = _run("--dry-run", "--out", name, cwd=tmp_path, block_torch=True)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert printed["library"] == str(build / "liblynx_moe.so") and printed["out"] == str(tmp_path / name)
    assert not (PLUGIN / name).exists()  # make was told the absolute folder, not one relative to plugins/lynx_moe
    assert printed["routing_calls"] > 1000 and printed["layer_calls"] > 500 and printed["kernel_sets"] == ["default", "new"]
    assert sum(printed["shares"].values()) == pytest.approx(1.0, abs=0.02)
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["status"] == "dry run" and results["sections"]["compile"]["status"] == "ok"


@pytest.mark.slow
def test_every_section_runs_its_code_on_the_cpu(tmp_path):
    r = _run("--device", "cpu", "--quick", "--library", str(core_build() / "liblynx_moe_fake_cuda.so"), "--out", str(tmp_path / "out"),
             "--budget-s", "200")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # no kernel ran: the checks fail, nothing raised
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == ["compile", "probe", "routing", "layer", "decode", "prefill"]
    assert {n: s["status"] for n, s in sections.items()} == {"compile": "ok", "probe": "ok", "routing": "failed", "layer": "failed",
                                                            "decode": "failed", "prefill": "failed"}, {n: s.get("error") for n, s in sections.items()}
    assert sections["probe"]["runs"] > 10 and sections["probe"]["kernel_sets"] == ["default", "new"]
    assert sections["routing"]["cases"] > 1000 and sections["layer"]["cases"] == 2 * 16 * 4  # both kernel sets
    assert [row["tokens"] for row in sections["decode"]["rows"]] == [1, 4, 16]
    assert set(sections["decode"]["rows"][0]) >= {"off/default", "off/new", "lynx/default", "lynx/new"}
    assert sections["decode"]["rows"][0]["off/new"]["calls_per_sample"] >= 2
    assert "| tiny | 16 |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_a_budget_that_cannot_be_met_truncates_every_section_before_its_first_case(tmp_path):
    """A budget of 0 s is spent before any case by construction: no machine is fast enough to finish one."""
    r = _run("--device", "cpu", "--quick", "--library", str(core_build() / "liblynx_moe_fake_cuda.so"), "--out", str(tmp_path / "out"),
             "--budget-s", "0", "--sections", "routing,layer,decode")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # a section that checked nothing has not passed
    sections = json.loads((tmp_path / "out" / "results.json").read_text())["sections"]
    assert {n: s["status"] for n, s in sections.items()} == {"compile": "ok", "routing": "failed", "layer": "failed", "decode": "failed"}
    assert sections["routing"]["truncated"] and sections["routing"]["cases"] == 0
    assert sections["layer"]["truncated"] and sections["layer"]["cases"] == 0
    assert sections["decode"]["truncated"] and sections["decode"]["rows"] == []
    assert sections["decode"]["skipped"] == ["tiny 1 tokens (budget)", "tiny 4 tokens (budget)", "tiny 16 tokens (budget)"]
    assert "(truncated by the budget)" in (tmp_path / "out" / "results.md").read_text()


def test_results_are_kept_after_each_section_and_a_raising_section_is_recorded(tmp_path):
    gpu_check = _module()
    results = gpu_check.Results(tmp_path, {"command": "test", "machine": {}, "plan": {}})
    results.run("first", lambda sec: sec.update(cases=3, passed=3))
    assert json.loads((tmp_path / "results.json").read_text())["sections"]["first"]["status"] == "ok"  # on disk before the next

    def broken(sec: dict) -> None:
        sec["cases"] = 1
        raise ZeroDivisionError("division by zero")

    results.run("second", broken)
    results.run("third", lambda sec: sec.update(failed=True))
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert [sections[n]["status"] for n in ("first", "second", "third")] == ["ok", "error", "failed"]
    assert sections["second"]["error"] == "ZeroDivisionError: division by zero" and "Traceback" in sections["second"]["traceback"]
    assert "- second: error" in (tmp_path / "results.md").read_text()


def test_timing_puts_many_calls_between_one_pair_of_marks():
    gpu_check = _module()
    log: list[object] = []

    class Mark:
        def __init__(self) -> None:
            self.at = len(log)

        def record(self) -> None:
            self.at = len(log)
            log.append("mark")

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Mark) -> float:
            return 20.0  # ms between the two marks

    seconds = gpu_check.time_calls(log.append, 50, 3, types.SimpleNamespace(mark=Mark))
    assert log == (["mark", *range(50), "mark"]) * 3
    assert seconds == [pytest.approx(20e-3 / 50)] * 3

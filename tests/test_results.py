"""The records that write manifest.json and report.json: their JSON, reading it back, and the schema
engines/README.md documents (generated from them, checked here)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from lynx_export.compiler.results import Manifest, Report, schema_section
from lynx_export.errors import DataError, OutputError
from lynx_export.records import Record, doc, record, schema_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


@record
class Inner(Record):
    x: int = doc("an integer")
    note: str | None = doc("optional text", None)


@record
class Outer(Record):
    name: str = doc("a name")
    items: tuple[Inner, ...] = doc("inner records")
    flat: Inner = doc("flattened", flatten=True)
    by_key: dict[str, Inner] = doc("a mapping of records")


def _outer() -> Outer:
    return Outer(name="a", items=(Inner(x=1), Inner(x=2, note="n")), flat=Inner(x=3), by_key={"k": Inner(x=4)})


def test_to_json_leaves_out_absent_optional_keys_and_flattens():
    assert _outer().to_json() == {"name": "a", "items": [{"x": 1}, {"x": 2, "note": "n"}], "x": 3, "by_key": {"k": {"x": 4}}}


def test_from_json_reads_back_what_to_json_wrote():
    assert Outer.from_json(_outer().to_json()) == _outer()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(extra=1), "Outer: unknown key(s) extra"),
    (lambda d: d["items"][1].update(y=1), "Outer.items[1]: unknown key(s) y"),
    (lambda d: d.pop("name"), "Outer: missing key name"),
    (lambda d: d.pop("x"), "Outer: missing key x"),
    (lambda d: d.update(items={}), "Outer.items: expected a list, got dict"),
])
def test_from_json_names_the_key_that_does_not_fit(edit, message):
    data = _outer().to_json()
    edit(data)
    with pytest.raises(DataError, match=re.escape(message)):
        Outer.from_json(data)


def test_schema_rows_name_nested_keys():
    rows = {key: (kind, meaning) for key, kind, meaning in schema_rows(Outer)}
    assert list(rows) == ["name", "items", "items[].x", "items[].note", "x", "note", "by_key", "by_key.*.x", "by_key.*.note"]
    assert rows["items"] == ("list of object", "inner records")
    assert rows["note"] == ("string", "(optional) optional text")


def test_engines_readme_documents_the_records():
    text = (ROOT / "engines" / "README.md").read_text()
    section = text.split("<!-- schema: begin -->\n", 1)[1].split("\n<!-- schema: end -->", 1)[0]
    assert section == schema_section(), "engines/README.md is stale: paste in `python -m lynx_export.compiler.results`"


@pytest.fixture(scope="module", params=[(), ("--quantize", "int4")], ids=["fp32", "int4"])
def demo_build(request, demo_builds) -> pathlib.Path:
    return demo_builds("--batch-sizes", "1,4", "--seq-lens", "1,3", *request.param).out


def _build_files(folder: pathlib.Path) -> tuple[dict, dict]:
    return json.loads((folder / "manifest.json").read_text()), json.loads((folder / "report.json").read_text())


def test_a_build_folder_reads_back_unchanged(demo_build):
    manifest, report = _build_files(demo_build)
    assert Manifest.from_json(manifest).to_json() == manifest
    assert Report.from_json(report).to_json() == report
    assert Manifest.read(demo_build) == Manifest.from_json(manifest)


def test_a_manifest_with_an_unknown_key_is_refused(demo_build, tmp_path):
    manifest, _ = _build_files(demo_build)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "from_the_future": 1}))
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'manifest.json'}: not a manifest.json this lynx-export reads "
                                                    "(manifest.json: unknown key(s) from_the_future)")):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(OutputError, match="not a manifest.json this lynx-export reads"):
        Manifest.read(tmp_path)
    with pytest.raises(OutputError, match=re.escape(f"{tmp_path / 'none'}: not a lynx-export build folder (no manifest.json)")):
        Manifest.read(tmp_path / "none")

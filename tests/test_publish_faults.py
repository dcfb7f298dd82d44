"""Publishing cannot lose the previous output: every write, fsync and rename fails in turn.

The calls are counted in a clean run first, so a publish step added later is covered without
touching these tests. Each failure must give a one-line OutputError, leave the previous output
byte for byte (or nothing, where there was none) and no hidden `.NAME.tmp-*` / `.NAME.old-*`
folder beside it; the one exception, a failure whose undoing fails too, must name the hidden
folder that still holds the previous output.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import pathlib
import shutil
from collections.abc import Callable

import pytest

from lynx_export.compiler.build import BuildOptions, PolicyChoice, build
from lynx_export.compiler.output import staged_file, staged_files, staged_folder
from lynx_export.compiler.verify import VerifyOptions
from lynx_export.errors import OutputError
from tests.test_form_ort_moe import make_model

KINDS = ("write", "fsync", "rename")
WRITE_MODES = set("wax+")


class Faults:
    """Counts writes (opening a file under `root` for writing), os.fsync and os.replace calls, and
    makes chosen ones, `(kind, index)`, fail with an OSError (or any exception given)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: pathlib.Path) -> None:
        self.root = os.path.join(os.path.abspath(root), "")
        self.counts = dict.fromkeys(KINDS, 0)
        self.fail: dict[tuple[str, int], BaseException] = {}
        self.fsynced: list[str] = []
        real_open, real_fsync, real_replace = builtins.open, os.fsync, os.replace

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and WRITE_MODES & set(mode) and os.path.abspath(file).startswith(self.root):
                self._hit("write")
            return real_open(file, mode, *args, **kwargs)

        def fake_fsync(fd):
            self._hit("fsync")
            self.fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def fake_replace(src, dst, *args, **kwargs):
            self._hit("rename")
            return real_replace(src, dst, *args, **kwargs)

        # Path.write_text/write_bytes go through io.open, shutil.copyfile through builtins.open.
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(os, "replace", fake_replace)

    def _hit(self, kind: str) -> None:
        index = self.counts[kind]
        self.counts[kind] += 1
        exc = self.fail.get((kind, index))
        if exc is not None:
            raise exc

    def run(self, publish: Callable[[], object], fail: dict[tuple[str, int], BaseException] | None = None) -> dict[str, int]:
        """Call `publish` with the given failures; the calls it made, per kind."""
        self.counts = dict.fromkeys(KINDS, 0)
        self.fail = fail or {}
        self.fsynced = []
        try:
            publish()
        finally:
            self.fail = {}
        return dict(self.counts)


def injected(kind: str, index: int) -> OSError:
    return OSError(errno.EIO, f"injected {kind} failure #{index}")


def snapshot(folder: pathlib.Path) -> dict[str, bytes | None] | None:
    """Every entry under `folder`: file bytes, None for a folder; None when `folder` is absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def assert_untouched(out: pathlib.Path, before: dict | None, what: str) -> None:
    assert snapshot(out) == before, f"{what}: previous output changed"
    beside = sorted(p.name for p in out.parent.iterdir())
    assert beside == ([out.name] if before is not None else []), f"{what}: left beside the output: {beside}"


# -- staged_folder with a typical caller ---------------------------------------------------------


def publish_demo(out: pathlib.Path, tag: str = "new") -> None:
    """A caller's staged block: nested folders, text, binary and open()-written files."""
    with staged_folder(out) as staging:
        (staging / "sub" / "deeper").mkdir(parents=True)
        (staging / "a.txt").write_text(f"{tag} a\n")
        (staging / "sub" / "b.bin").write_bytes(f"{tag} b".encode() + b"\x00\xff")
        with open(staging / "sub" / "deeper" / "c.csv", "w") as f:
            f.write(f"x,y\n{tag},1\n")
        (staging / "empty").mkdir()


def previous_demo(out: pathlib.Path) -> None:
    out.mkdir(parents=True)
    (out / "old.txt").write_text("previous output\n")
    (out / "nested").mkdir()
    (out / "nested" / "weights.bin").write_bytes(bytes(range(256)))


def check_every_failure(faults: Faults, out: pathlib.Path, publish: Callable[[], object], kind: str) -> int:
    """Fail each `kind` call of a clean publish in turn; the number of calls covered."""
    before = snapshot(out)
    clean = faults.run(publish)
    assert clean[kind] > 0, f"a publish makes no {kind} call"
    published = snapshot(out)
    for index in range(clean[kind]):
        restore(out, before)
        what = f"{kind} #{index} of {clean[kind]}"
        with pytest.raises(OutputError) as info:
            faults.run(publish, {(kind, index): injected(kind, index)})
        message = str(info.value)
        assert "\n" not in message and f"injected {kind} failure #{index}" in message, what
        assert message.endswith("the previous output is intact" if before is not None else "nothing was published"), message
        assert_untouched(out, before, what)
    restore(out, before)
    faults.run(publish)  # and nothing was left that stops the next publish
    assert snapshot(out) == published
    return clean[kind]


def restore(out: pathlib.Path, content: dict | None) -> None:
    """Put `out` back to a snapshot (between injected runs; a passing run publishes)."""
    shutil.rmtree(out, ignore_errors=True)
    if content is None:
        return
    out.mkdir()
    for rel, data in content.items():
        if data is None:
            (out / rel).mkdir(parents=True, exist_ok=True)
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


@pytest.mark.parametrize("previous", [True, False], ids=["replace", "fresh"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_failure_keeps_the_previous_output(tmp_path, monkeypatch, kind, previous):
    out = tmp_path / "pub" / "out"
    if previous:
        previous_demo(out)
    else:
        out.parent.mkdir()
    calls = check_every_failure(Faults(monkeypatch, tmp_path), out, lambda: publish_demo(out), kind)
    # 3 files; 4 staged folders + the parent; a previous output is moved aside first.
    assert calls == {"write": 3, "fsync": 8, "rename": 2 if previous else 1}[kind]


def test_success_syncs_every_staged_file_and_folder_bottom_up(tmp_path, monkeypatch):
    out = tmp_path / "out"
    previous_demo(out)
    faults = Faults(monkeypatch, tmp_path)
    faults.run(lambda: publish_demo(out))
    parent = str(tmp_path.resolve())
    staged = [pathlib.Path(p) for p in faults.fsynced[:-1]]
    assert faults.fsynced[-1] == parent  # after the renames: they are durable too
    staging = staged[-1]  # the staging folder itself, synced last of the tree
    assert staging.parent == pathlib.Path(parent) and staging.name.startswith(".out.tmp-")
    relative = [str(p.relative_to(staging)) for p in staged]
    assert sorted(relative) == sorted(["."] + list(snapshot(out)))  # each once, nothing else
    position = {rel: i for i, rel in enumerate(relative)}
    for rel in relative[:-1]:  # each entry before its folder: bottom-up
        assert position[rel] < position[os.path.dirname(rel) or "."], rel


@pytest.mark.parametrize("second", [("rename", 1), ("fsync", 7)], ids=["rename-into-place", "sync-parent"])
def test_failed_undo_names_the_folder_holding_the_previous_output(tmp_path, monkeypatch, second):
    out = tmp_path / "out"
    previous_demo(out)
    before = snapshot(out)
    faults = Faults(monkeypatch, tmp_path)
    restore_call = ("rename", 2)  # the first rename that undoes the failed step
    with pytest.raises(OutputError) as info:
        faults.run(lambda: publish_demo(out), {second: injected(*second), restore_call: injected(*restore_call)})
    message = str(info.value)
    assert "\n" not in message and "injected rename failure #2" in message
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(hidden) == 1 and str(hidden[0] / "previous") in message
    assert snapshot(hidden[0] / "previous") == before
    assert not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())


def test_interrupt_between_the_renames_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    previous_demo(out)
    before = snapshot(out)
    faults = Faults(monkeypatch, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        faults.run(lambda: publish_demo(out), {("rename", 1): KeyboardInterrupt()})
    assert_untouched(out, before, "interrupt")


def test_interrupt_inside_the_block_removes_the_staging_folder(tmp_path):
    out = tmp_path / "out"
    previous_demo(out)
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "partial").write_text("half")
        raise KeyboardInterrupt
    assert_untouched(out, before, "interrupt")


# -- staged_files: files into a folder that holds others ------------------------------------------


def publish_files(folder: pathlib.Path, tag: str = "new") -> None:
    """A model and the data file it names, written among the folder's other files."""
    with staged_files(folder, last="m.onnx") as staging:
        (staging / "m.onnx.data").write_bytes(f"{tag} data".encode())
        (staging / "m.onnx").write_text(f"{tag} model")


def test_files_replace_only_their_names_and_the_named_file_goes_last(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "other.txt").write_text("kept")
    publish_files(folder, "old")
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(pathlib.Path(dst).name), real_replace(src, dst)))
    publish_files(folder)
    assert renamed == ["m.onnx.data", "m.onnx"]  # the model never names data that is not there
    assert snapshot(folder) == {"m.onnx": b"new model", "m.onnx.data": b"new data", "other.txt": b"kept"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_failure_before_the_renames_keeps_the_files(tmp_path, monkeypatch, kind):
    """A failed write or sync leaves every file as it was and nothing staged; a failed rename
    leaves the files renamed before it new (each file is atomic, not the set) and nothing staged."""
    folder = tmp_path / "f"
    folder.mkdir()
    publish_files(folder, "old")
    before = snapshot(folder)
    faults = Faults(monkeypatch, tmp_path)
    calls = faults.run(lambda: publish_files(folder))[kind]
    publish_files(folder, "old")
    for index in range(calls):
        with pytest.raises(OutputError) as info:
            faults.run(lambda: publish_files(folder), {(kind, index): injected(kind, index)})
        assert "\n" not in str(info.value) and f"injected {kind} failure #{index}" in str(info.value)
        after = snapshot(folder)
        if kind == "rename":
            assert after == {**before, **{"m.onnx.data": b"new data"}} if index == 1 else after == before
        elif not (kind == "fsync" and index == calls - 1):  # the folder's own sync comes after the renames
            assert after == before, (kind, index)
        assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging folder left
        publish_files(folder, "old")


def test_staged_file_writes_one_file_and_an_interrupt_writes_none(tmp_path):
    path = tmp_path / "t" / "trace.npz"
    with staged_file(path) as partial:
        partial.write_bytes(b"one")
    with pytest.raises(KeyboardInterrupt), staged_file(path) as partial:
        partial.write_bytes(b"half")
        raise KeyboardInterrupt
    assert snapshot(path.parent) == {"trace.npz": b"one"}


# -- the Triton repository writer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> pathlib.Path:
    """The smallest real build: one com.microsoft.MoE layer, verified at one case."""
    root = tmp_path_factory.mktemp("publish-build")
    model, _ = make_model(root / "model.onnx")
    options = BuildOptions(PolicyChoice("off"), verify=VerifyOptions(batch_sizes=(1,), seq_lens=(1,)))
    return build(model, root / "build", options).out_dir


@pytest.mark.parametrize("previous", [True, False], ids=["replace", "fresh"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_repository_keeps_the_previous_one(tiny_build, tmp_path, monkeypatch, kind, previous):
    pytest.importorskip("tritonclient")
    from lynx_export.serving.repository import TritonOptions, write_repository

    repo = tmp_path / "pub" / "repo"
    if previous:
        write_repository(tiny_build, repo, TritonOptions(name="previous"))
    else:
        repo.parent.mkdir()
    publish = lambda: write_repository(tiny_build, repo, TritonOptions(name="next", force=True))  # noqa: E731
    calls = check_every_failure(Faults(monkeypatch, tmp_path), repo, publish, kind)
    # config.pbtxt x2, model.ort.onnx, model.py, model.onnx, README.md; those + 5 folders + the parent.
    assert calls == {"write": 6, "fsync": 12, "rename": 2 if previous else 1}[kind]

"""Training: the loss falls, an interrupted run resumes to the same weights, weights round-trip."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lynx_export.evaluation import corpus  # noqa: E402
from lynx_export.evaluation.demo import DemoConfig  # noqa: E402
from lynx_export.evaluation.train import TrainConfig, train  # noqa: E402
from lynx_export.evaluation.trained import TrainedModelError, load_trained_model, read_metadata, save_weights  # noqa: E402
from lynx_export.progress import Progress, Recorder  # noqa: E402

TINY = DemoConfig(hidden_size=32, num_layers=2, num_heads=2, expert_size=32)
CONFIG = TrainConfig(steps=12, batch=4, seq_len=32, warmup=2, eval_every=4, eval_sequences=4, threads=1)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> corpus.Corpus:
    d = tmp_path_factory.mktemp("text")
    (d / "a.py").write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return corpus.text_corpus([d])


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_loss_falls(tmp_path, text):
    _, meta = train(TINY, CONFIG, text, text, tmp_path / "ckpt")
    history = meta["history"]
    assert [h["step"] for h in history] == [4, 8, 12]
    assert history[-1]["bits_per_byte"] < history[0]["bits_per_byte"]
    assert 0 < history[-1]["balance_loss"] < 2  # 1.0 is perfectly balanced routing


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, text):
    straight, _ = train(TINY, CONFIG, text, text, tmp_path / "a.ckpt")

    class StopAfterFirstCheckpoint(Progress):
        def step(self, stage: str, i: int, n: int, detail: str = "") -> None:
            if (stage, i) == ("step", 4):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TINY, CONFIG, text, text, tmp_path / "b.ckpt", progress=StopAfterFirstCheckpoint())
    messages = Recorder()
    resumed, meta = train(TINY, CONFIG, text, text, tmp_path / "b.ckpt", progress=messages)
    assert messages.lines[0] == "resuming at step 4"
    assert [h["step"] for h in meta["history"]] == [4, 8, 12]
    a, b = _state(straight), _state(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_configuration(tmp_path, text):
    train(TINY, TrainConfig(**{**CONFIG.__dict__, "steps": 4}), text, text, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="another configuration"):
        train(TINY, CONFIG, text, text, tmp_path / "c.ckpt")


def test_weights_round_trip_in_float16(tmp_path, text):
    model, meta = train(TINY, TrainConfig(**{**CONFIG.__dict__, "steps": 4}), text, text, tmp_path / "d.ckpt")
    save_weights(model, meta, tmp_path / "w.npz")
    assert read_metadata(tmp_path / "w.npz")["model"] == TINY.to_dict()
    back = load_trained_model(tmp_path / "w.npz")
    for name, value in _state(model).items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), value.astype(np.float16).astype(np.float32))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "bad.json").write_text((tmp_path / "w.json").read_text())
    with pytest.raises(TrainedModelError, match="cannot read the weights"):
        load_trained_model(tmp_path / "bad.npz")


def test_expert_dispatch_is_checked_and_restored():
    """Every MoE block's dispatch is set in one place: an unknown one is refused (it would silently
    take the exporter's slow form), and `dispatched` gives each block its own back."""
    from lynx_export.evaluation.demo import build_demo_model, dispatched, moe_blocks, set_dispatch

    model = build_demo_model(TINY)
    with pytest.raises(ValueError, match="unknown expert dispatch 'groupd'"):
        set_dispatch(model, "groupd")
    set_dispatch(model, "loop")
    hook = object()
    with dispatched(model, "grouped", hook):
        assert {(b.dispatch, b.selector) for b in moe_blocks(model)} == {("grouped", hook)}
    assert {(b.dispatch, b.selector) for b in moe_blocks(model)} == {("loop", None)}

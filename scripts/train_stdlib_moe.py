#!/usr/bin/env python3
"""Train the shipped MoE language model on the Python standard library's source (CPU, fixed seed).

    python scripts/train_stdlib_moe.py --model fine         # writes lynx_export/evaluation/data/stdlib_moe_fine.{npz,json}
    python scripts/train_stdlib_moe.py --model coarse --dispatch loop   # the coarse model, as it was made
    python scripts/train_stdlib_moe.py --model fine --steps 50 --out /tmp/smoke.npz   # a smoke run

Interrupt it at any time: it resumes from its checkpoint (written every --eval-every steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import sys
import time

from lynx_export.cli._common import progress
from lynx_export.evaluation import corpus, trained
from lynx_export.evaluation.train import TrainConfig, train


def main() -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(trained.TRAINED_MODELS), default=trained.DEFAULT_TRAINED, help="which shipped model to train")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="weights file (.npz; default: the shipped one); metadata goes next to it (.json)")
    parser.add_argument("--checkpoint", type=pathlib.Path, default=None, help="default: OUT with suffix .ckpt")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    args = parser.parse_args()
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    shipped = trained.trained_model(args.model)
    out = args.out or shipped.weights
    checkpoint = args.checkpoint or out.with_suffix(".ckpt")

    train_text = corpus.stdlib_corpus("train")
    heldout_text = corpus.stdlib_corpus("held_out")
    print(f"corpus: {corpus.stdlib_root()} (Python {platform.python_version()}): train {len(train_text.files)} files, "
          f"{train_text.data.size / 1e6:.1f} MB; held-out {len(heldout_text.files)} files, {heldout_text.data.size / 1e6:.1f} MB", flush=True)
    began = time.monotonic()
    model, meta = train(shipped.config, config, train_text, heldout_text, checkpoint, progress=progress)
    import torch

    meta.update({
        "corpus": {
            "source": "Python standard library .py files (tests, idlelib, lib2to3 and site-packages excluded)",
            "python": platform.python_version(),
            "split": "held out when sha1(path relative to the library root)[0] < 26 (about 10% of files)",
            "train_files": len(train_text.files), "train_bytes": int(train_text.data.size),
            "held_out_files": len(heldout_text.files), "held_out_bytes": int(heldout_text.data.size),
        },
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "wall_seconds_this_run": round(time.monotonic() - began, 1),
        "command": "python scripts/train_stdlib_moe.py " + " ".join(sys.argv[1:]),
    })
    trained.save_weights(model, meta, out)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

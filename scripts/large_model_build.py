#!/usr/bin/env python3
"""Time and peak memory of `lynx-export build --backend ort` on a large demo model.

Exports the demo LM at a size given on the command line (default: 4 layers, H 1024, 8 experts
of I 2816, about 1.2 GB), stores its weights as external data (as every model over 2 GB must
be), then runs the build in a child process and reports its wall time and peak resident memory
(the child's ru_maxrss) against the model's size, plus the files written:

    python scripts/large_model_build.py [--layers 4] [--hidden 1024] [--inter 2816] [--out /tmp/lynx-large]
                                         [--batch-sizes 1,8,32] [--seq-lens 1,16]

The verification runs the *original* model on ONNX Runtime; its batched-matmul expert form
gathers a copy of the expert weights per token (tokens x K x 3 x I x H floats per layer), so the
build limits the tokens per verification case to keep those copies under a quarter of the model
(the report lists the cases it skipped).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


_MEASURED_CLI = """
import resource, sys
from lynx_export.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def export(path: pathlib.Path, layers: int, hidden: int, inter: int) -> None:
    import onnx

    from lynx_export.evaluation.demo import DemoConfig, export_demo_model

    if path.exists():
        return
    inline = path.with_name("inline.onnx")
    export_demo_model(inline, DemoConfig(hidden_size=hidden, num_layers=layers, num_heads=8, expert_size=inter))
    model = onnx.load(str(inline))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    inline.unlink()
    inline.with_name(inline.name + ".data").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/lynx-large"))
    parser.add_argument("--batch-sizes", help="verification batch sizes (default: the build's)")
    parser.add_argument("--seq-lens", help="verification sequence lengths (default: the build's)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / f"moe-{args.layers}x{args.hidden}x{args.inter}" / "model.onnx"
    source.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    export(source, args.layers, args.hidden, args.inter)
    export_s = time.perf_counter() - started
    model_bytes = sum(p.stat().st_size for p in source.parent.iterdir() if p.name.startswith("model.onnx"))

    build_dir = args.out / "build"
    command = ["build", str(source), "-o", str(build_dir), "--force", "--backend", "ort"]
    for flag, value in (("--batch-sizes", args.batch_sizes), ("--seq-lens", args.seq_lens)):
        command += [flag, value] if value else []
    started = time.perf_counter()
    # The build runs in a fresh process that reports its own peak (ru_maxrss, KiB on Linux).
    proc = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *command], capture_output=True, text=True)
    build_s = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    peak = int(proc.stderr.strip().splitlines()[-1].removeprefix("peak_rss_kib ")) * 1024
    written = {p.name: p.stat().st_size for p in sorted(build_dir.iterdir())}
    result = {
        "command": " ".join(["python", "scripts/large_model_build.py", *sys.argv[1:]]),
        "model": {"layers": args.layers, "hidden": args.hidden, "expert_size": args.inter, "experts": 8, "top_k": 2,
                  "bytes": model_bytes, "external_data": True},
        "export_s": round(export_s, 1),
        "build": {"command": "lynx-export " + " ".join(command), "wall_s": round(build_s, 1), "peak_rss_bytes": peak,
                  "peak_over_model": round(peak / model_bytes, 2)},
        "written": written,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

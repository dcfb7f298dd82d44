#!/usr/bin/env python3
"""Engine benchmark: dense twin vs MoE vs MoE+LYNX over decode batch sizes.

Same as `lynx-export bench`: a preset (`--preset demo|mixtral|fine`), the trained model
(`--trained`) or any model the pass supports (`scripts/bench_engines.py MODEL.onnx`), at fp32 and
`--quantize int4,int8`, optionally routing on a trained model's router logits (`--routing-trace
TRACE.npz`); run `python scripts/bench_engines.py --help` for the options.
"""

import sys

from lynx_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

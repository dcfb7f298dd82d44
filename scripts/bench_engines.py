#!/usr/bin/env python3
"""Engine benchmark: dense twin vs MoE vs MoE+LYNX over decode batch sizes.

Same as `lynx-export bench`; run `python scripts/bench_engines.py --help` for the options.
"""

import sys

from lynx_export.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

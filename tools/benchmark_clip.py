#!/usr/bin/env python
"""Deprecated (one release): ``tools/benchmark.py clip ...``, to which this forwards."""

import os
import runpy


def main(argv=None):
    tool = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py"))
    return tool["forward"]("clip", argv)


if __name__ == "__main__":
    main()

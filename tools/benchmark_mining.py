#!/usr/bin/env python
"""Deprecated (one release): ``tools/benchmark.py mining ...``, to which this forwards."""

import os
import runpy


def main(argv=None):
    tool = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py"))
    return tool["forward"]("mining", argv)


if __name__ == "__main__":
    main()

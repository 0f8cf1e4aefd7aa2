"""metaemu benchmarks: run ``python benchmarks/run.py [--quick]`` (see benchmarks/README.md)."""

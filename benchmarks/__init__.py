"""LiverTumorSeg benchmark suite: ``python benchmarks/run.py [--quick] [--json OUT.json]``.

See BENCHMARKS.md for the latest tables and the commands that produced them.
"""

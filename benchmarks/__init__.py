"""Benchmarks of gemma_mt (speed, memory, recipe search), run from the repo
root as modules, e.g. `python -m benchmarks.benchmark_decode_step --help`.

They use gemma_mt's public API only; `common` holds what they share.
"""

"""Benchmarks for tunproxy (issue 7); run ``python3 bench/run.py --help`` from the repo root."""

"""Benchmarks for quicksilver, run side by side with baseline servers.

Run ``python -m bench`` for every scenario or ``python -m bench NAME --help`` for one of them.
"""

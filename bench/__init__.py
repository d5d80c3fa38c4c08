"""Benchmarks: ``python -m bench`` (throughput, db, dispatch, topology)."""

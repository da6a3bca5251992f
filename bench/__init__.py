"""Benchmarks of seqserve against a naive baseline, a transport ceiling and a
compute ceiling; run them with `python -m bench` from the repository root."""

"""The load harness, one module per question (see benchmarks/__init__.py)."""

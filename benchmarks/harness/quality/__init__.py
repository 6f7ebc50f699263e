"""Scoring what comes back under load: FIM exact match, HumanEval pass@k (tests run in a
sandboxed subprocess), and temperature-0 equivalence with the same prompt sent alone."""

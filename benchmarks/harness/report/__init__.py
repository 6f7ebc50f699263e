"""How results are shown: one JSON per run (vLLM-compatible summary keys at the top),
a Markdown summary, and PNG plots (latency CDFs, a timeline, and throughput/latency
against offered load for multi-step runs); write.py puts a run's report in a folder."""

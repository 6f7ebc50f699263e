"""The load harness: drive any OpenAI-compatible endpoint and report honestly.

- cli.py: `codellama-serve bench …` (also `python -m benchmarks …`).
- profiles/: the bundled YAML profiles (and the trace one of them replays).
- harness/: the product, one module per question: profile/ (how load is shaped:
  schema, files, arrivals, traces), datasets (what is sent), client, sse, transport,
  records and client_health (how it is sent and timed), metrics and server_metrics
  (what is measured), plans, phases, runner, sweeps, caveats and results (one profile
  against one endpoint), compare (several endpoints), report/ (JSON, Markdown,
  plots), fake_server (its own test double).
- experiments/: the project's own experiments on the harness: parity, ray_modes,
  soak, serve_and_bench (`make bench`), with trials and local_servers they share.
"""

__version__ = "0.1.0"

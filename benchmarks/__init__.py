"""The load harness: drive any OpenAI-compatible endpoint and report honestly.

- cli.py: `codellama-serve bench …` (also `python -m benchmarks …`).
- profiles/: the bundled YAML profiles (and the trace one of them replays).
- harness/: the product, one module per question: profile/ (how load is shaped:
  schema, workloads, files, arrivals, traces), datasets, shared_prefix and
  chat_sessions (what is sent), editor/ (virtual developers typing: corpus, window,
  session, driver, workload, summary), client, sse, transport, records and
  client_health (how it is sent and timed), metrics and server_metrics (what is
  measured), quality/ (scoring outputs: exact match, pass@k in a sandbox,
  equivalence), plans, phases, session_phase, runner, sweeps, caveats, results and
  workload_sections (one profile against one endpoint), api (the same from Python),
  compare (several endpoints), report/ (JSON, Markdown, plots), fake_server and
  fake_answers (its own test double).
- experiments/: the project's own experiments on the harness: parity, ray_modes,
  soak, serve_and_bench (`make bench`), with trials and local_servers they share.
"""

__version__ = "0.1.0"

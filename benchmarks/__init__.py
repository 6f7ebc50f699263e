"""The load harness: drive any OpenAI-compatible endpoint and report honestly.

One module per question: profiles (how load is shaped), datasets (what is
sent), client (how it is sent and timed), metrics (what is measured),
server_metrics (the server's own view), report (JSON, Markdown, plots),
runner (one profile against one endpoint), compare (several endpoints).
"""

__version__ = "0.1.0"

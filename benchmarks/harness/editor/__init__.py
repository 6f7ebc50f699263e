"""Editor traffic: virtual developers typing real Python source, FIM after each pause.

corpus (what is typed, repos and their context headers), window (what of the file a
request carries), session (one developer as a pure state machine), driver (sessions
on a real or injected clock, sending and cancelling), summary (the report's `editor`).
"""

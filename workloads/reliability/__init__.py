"""Reliability scenarios (faults, bad input, load), shared by ``tests/reliability`` and
``kvfuse bench reliability``; see ``docs/reliability.md``."""

"""Evaluation: suites (attacks, prefilling, refusal position and probe, helpfulness), judges
that decide refusals, their reports, and run.py's eval mode."""

"""Evaluate the hybrid trade-off on your own questions: every question answered in `think`,
`direct` and `auto` mode, scored by predictable rules, summarised per mode and per category, with
the accuracy-vs-tokens curve of auto routing over all thresholds computed from those three runs.

In data-flow order: `dataset.py` (the JSONL format and its refusals), `matching.py` (how an answer
is scored), `runner.py` (the three runs, batched), `report.py` (summaries and the curve),
`samples.py` (the built-in datasets), `cli.py` (`python -m metis eval --data FILE`).
"""

"""Serving: the one interface (interface.py) and the backends behind it.

Local: `engine.Engine` answers with the model in this process, several users per `generate`
call (batch.py) in batches formed by scheduler.py. Remote: `remote.RemoteEngine` routes here and
streams answers from two OpenAI-compatible servers. The UI, the CLI and the tests see only
`route`, `stream` (typed events), `run` and `describe`.
"""

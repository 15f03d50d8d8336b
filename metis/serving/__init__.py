"""Serving: the one interface (interface.py) and the backends behind it.

Local: `engine.Engine` answers with the model in this process, several users decoding together in
one running batch (batch.py) that newcomers join between steps (scheduler.py); the records they
share live in requests.py. Remote: `remote.RemoteEngine` routes here and
streams answers from two OpenAI-compatible servers. The UI, the CLI and the tests see only
`route`, `stream` (typed events), `run` and `describe`.
"""

"""Serving backends behind the engine interface (route, stream, run, info)."""

"""Benchmarks of the Metis-HOME demo: `python -m bench [--quick] [--json FILE] [--model SPEC]`.

One module per measurement (streaming, routing, server, hybrid, scaling, memory, gpu); `common`
holds the model under test and the alternating, median-of-repeats timing they all use.
"""

"""The benchmark harness behind ``sbpatch bench`` and the scripts in ``benchmarks/``.

* :mod:`sbpatch.bench.workloads`: model names, the per-library PGD names, which rows to run (no torch import);
* :mod:`sbpatch.bench.models`: the victim models, data and the hand-written limit attack;
* :mod:`sbpatch.bench.runner`: the four columns measured interleaved, memory figures;
* :mod:`sbpatch.bench.report`: machine header, rich table, JSON, markdown, bar chart;
* :mod:`sbpatch.bench.cli`: the command's options and entry point.
"""

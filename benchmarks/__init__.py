"""lidgate benchmarks (``make bench``): bound-pass cost and LID reproduction/timings.

Run ``python -m benchmarks.bounds`` and ``python -m benchmarks.lid``; each writes a markdown report
under ``benchmarks/results/``.
"""

"""The benchmarks behind results/: run from the repository root as ``python -m benchmarks.<name>``.

``tasks`` holds the problems they train, ``provenance`` what each result records about the code that
produced it. Each benchmark prints its table and writes it, with its command, under ``results/``.
"""

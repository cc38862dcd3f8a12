"""Benchmarks of fewshot against reference implementations (run by ``python bench/run_all.py``).

Not part of the library and not run by CI: see ``docs/benchmarks.md`` for the results and
``bench/run_all.py`` for the one command that produces them.
"""

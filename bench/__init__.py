"""wsgistack's benchmark suite: ``make bench`` (``python -m bench``), ``--quick`` for a smoke run.

See bench/run.py for what is measured and bench/RESULTS.md for the last results.
"""

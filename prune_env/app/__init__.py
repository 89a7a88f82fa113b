"""The application layer: the search job, the benchmark harness and the ``prune-env`` command line.

It sits above both the library (:mod:`prune_env`) and the search methods (:mod:`agents`) and is the only
place that imports both; neither imports it.
"""

"""The project's benchmark studies, run from the repository root as ``python -m benchmarks.<study>``.

``benchmarks.protocol`` holds the training protocol and the cached, sharded runs every learning study shares;
``benchmarks.reporting`` the results folders and the provenance line of every results file. ``benchmarks/README.md``
lists the studies, their commands and their results. Not part of the installed package (the wheel holds
``gnivo_trl`` only).
"""

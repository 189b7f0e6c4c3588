"""The project's benchmark studies, run from the repository root as ``python -m benchmarks.<study>``.

``benchmarks.protocol`` holds the training protocol and the cached, sharded runs every learning study shares;
``benchmarks.reporting`` the results folders and the provenance line of every results file. ``benchmarks/README.md``
lists the studies, their commands and their results. Not part of the installed package (the wheel holds
``gnivo_trl`` only).
"""

import os

# The studies are entry points run offline: they build their models, tokenizers and data locally, and TRL's trainers
# send telemetry from __init__. Set when the package is imported, before a study imports any Hugging Face library.
# (The library, gnivo_trl, leaves the environment alone.)
for _variable in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_variable, "1")

"""Example recipes that apply limeify to small offline models and data sets.

Run one from the repository root as a module, e.g. `python -m recipes.finetune_routers --help`.
"""

import os

# Idle OpenMP threads sleep instead of spinning: on a shared or oversubscribed CPU, spinning
# threads make small ops 100-1000x slower. The package is imported before any recipe module, so
# this runs before torch loads; export OMP_WAIT_POLICY=ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

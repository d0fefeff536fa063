"""Lightning tasks (classification, detection, segmentation) built on the MobileOne backbone.

Importing the package (``python -m tasks.<task>`` does so first) shortens how long torch's OpenMP
threads spin while waiting for work, unless the environment already sets it: with GNU OpenMP's
default (300 000 spins) two trainings sharing a 2-core machine each ran at 3% of their speed alone,
with ``GOMP_SPINCOUNT=1000`` at about 40%, for about 8% of the speed alone
(``python -m benchmarks.concurrency``, docs/training.md). It acts only when set before torch is
first imported.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

"""Lightning tasks (classification, detection, segmentation) built on the MobileOne backbone.

A process started as one of the tasks' command lines (``python -m tasks.<task>``, which imports this
package while Python still locates the module, ``sys.argv[0] == "-m"``) shortens how long torch's
OpenMP threads spin while waiting for work, unless the environment already sets it: with GNU
OpenMP's default (300 000 spins) two trainings sharing a 2-core machine each ran at 3% of their speed
alone, with ``GOMP_SPINCOUNT=1000`` at about 40%, for about 8% of the speed alone
(``python -m benchmarks.concurrency``, docs/training.md). Importing the package from Python leaves
the environment alone.
"""

import os
import sys

if sys.argv[:1] == ["-m"]:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

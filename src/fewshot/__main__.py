"""``python -m fewshot ...`` is the ``fewshot`` command, e.g. for torchrun:
``torchrun --nproc_per_node=2 -m fewshot train --data ... --out RUN_DIR``.

(A module ``fewshot.train`` would shadow the Python API's :func:`fewshot.train` once imported,
so the entry is the package itself.)
"""

import sys

from fewshot.cli import main

if __name__ == "__main__":
    sys.exit(main())

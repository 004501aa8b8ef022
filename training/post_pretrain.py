"""``python training/post_pretrain.py ARGS``: the same as ``mugstan-train ARGS``, from a checkout without installing it.

The code is the package ``mugstan_train`` (docs/training.md); this file only puts the checkout
it sits in first on the import path, in place of its own folder (which holds nothing importable),
and runs ``mugstan_train.post_pretrain.main``. Works from any directory, and under torchrun and srun.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from mugstan_train.post_pretrain import main  # noqa: E402 (after the import path is set)

if __name__ == "__main__":
    raise SystemExit(main())

"""Loading a script of scripts/ as a module in a test, without adding scripts/ to the import path.

A script imports its sibling helpers by bare name (``import benchlib``), which works
when it is run as ``python scripts/x.py``; a test loads those siblings first with
:func:`load_script`, which registers each under that bare name in ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, *siblings: str) -> ModuleType:
    """``scripts/NAME.py`` as module ``NAME``, after the sibling scripts it imports by name."""
    for sibling in siblings:
        load_script(sibling)
    path = SCRIPTS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the scripts' own imports look the module up by name
    spec.loader.exec_module(module)
    return module

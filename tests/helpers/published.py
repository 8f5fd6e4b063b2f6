"""The registry of published results (`experiments/published.py`), imported once by path for every test.

    from tests.helpers.published import PUBLISHED
    PUBLISHED.SOURCES[0].module()   # a script, imported by path
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers.paths import EXPERIMENTS


def _registry() -> ModuleType:
    if "published" in sys.modules:  # the scripts import it by name: one module for them and the tests
        return sys.modules["published"]
    spec = importlib.util.spec_from_file_location("published", EXPERIMENTS / "published.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["published"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


PUBLISHED = _registry()

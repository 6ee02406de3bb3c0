"""Make PyPI's torchvision importable beside the CPU build of torch.

PyPI's torchvision wheel is built against CUDA torch; beside the CPU wheel its compiled
extension (`_C.so`) fails to load, and `import torchvision` then dies registering fake kernels
for `torchvision::nms` and `torchvision::qnms`, operators that only the extension defines.
transformers and diffusers import torchvision whenever it is installed, so the failure breaks
the whole toolkit, not just evaluation. When (and only when) the extension cannot load, the two
operator schemas are declared here, without kernels: the models, feature extraction and
transforms HAVIR uses then work; `torchvision.ops` detection operators stay unavailable.

`import havir` only installs an import hook: the check (which imports torch) runs the first time
anything imports torchvision, so commands that never need torch do not pay for it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Kept referenced for the life of the process: dropping the Library object unregisters the ops.
_SCHEMA_LIBRARY = None  # a torch.library.Library once the schemas are declared

_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's operator schemas if its extension cannot load.

    Returns True when the schemas were declared (the compiled extension is unusable here),
    False when torchvision is absent, already imported, or its extension loads.
    """
    global _SCHEMA_LIBRARY
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _BeforeTorchvision)]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _SCHEMA_LIBRARY is not None:
        return False
    if "torchvision" in sys.modules:
        return False
    import torch

    extensions = sorted(Path(spec.origin).parent.glob("_C.*"))
    if extensions:
        try:
            torch.ops.load_library(str(extensions[0]))
            return False
        except OSError:
            pass
    _SCHEMA_LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_SCHEMAS.values():
        _SCHEMA_LIBRARY.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_importable` when torchvision is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            ensure_torchvision_importable()  # removes this finder first
        return None  # the normal finders import the module


def install_import_hook() -> None:
    """Make the first ``import torchvision`` (by HAVIR, transformers or diffusers) go through the shim."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())

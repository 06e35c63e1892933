"""Optional imports with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> (pip extra of sb-finetune, pip package)
_EXTRAS = {
    "sklearn": ("digits", "scikit-learn"),
    "wandb": ("wandb", "wandb"),
    "pytest": ("test", "pytest"),
}


def require(module: str) -> ModuleType:
    """Import `module`, or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra, package = _EXTRAS.get(module.split(".")[0], (None, module.split(".")[0]))
        hint = f'pip install "sb-finetune[{extra}]"' if extra else f"pip install {package}"
        raise ImportError(f"sb-finetune needs the optional package '{package}' for this: {hint}") from err

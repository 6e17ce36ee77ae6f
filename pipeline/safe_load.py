"""Loading checkpoint files without ever running code that is in them.

A `.pt` file is a zip holding a pickle, and unpickling can call any Python function the file names: a payload
planted in a checkpoint (they get copied between users and clusters) would run inside `pope train`, `pope export`
or `pope eval`. Two guards, both needed:

1. `check_file(path)` reads the pickle's opcodes without executing them and refuses, in one line naming the
   file, any global outside `allowed_globals()` (tensors, plain containers and numbers, and the few DeepSpeed
   classes its optimizer checkpoints hold: loss scalers, the ZeRO stage enum, fragment addresses).
2. `enforce()` sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 for the process, so every `torch.load`, including the ones
   DeepSpeed makes with `weights_only=False` (its checkpoint engine, zero_to_fp32), goes through torch's
   restricted unpickler, and allow-lists the same DeepSpeed classes there. A file swapped between the check and
   the load still cannot run code.

The project's own files hold only tensors and plain types (RNG states are stored as tensors, see
pipeline/checkpoint.py). numpy's array reconstruction is allowed for reading RNG files written before that.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpoint(ValueError):
    """A file that would run code (or cannot be checked) when loaded; its message is one line naming it."""


def _deepspeed_classes() -> list[Any]:
    """The DeepSpeed classes that appear in its own optimizer checkpoints (seen for ZeRO 0-3, fp32/bf16/fp16)."""
    classes: list[Any] = []
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # no probing chatter
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        classes += [LossScaler, DynamicLossScaler, ZeroStageEnum]
        from deepspeed.utils.tensor_fragment import fragment_address

        classes.append(fragment_address)
    except ImportError:  # an older DeepSpeed without one of them: its files cannot hold it either
        pass
    return classes


def _numpy_globals() -> list[Any]:
    """What a pickled numpy array needs (legacy RNG files): array reconstruction, ndarray, dtypes."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [getattr(np.dtypes, name) for name in ("UInt32DType", "Float64DType", "Int64DType")
              if hasattr(np, "dtypes") and hasattr(np.dtypes, name)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def allowed_globals() -> set[str]:
    """Fully qualified names of the globals a checkpoint may name beyond torch's own safe set."""
    names = {_qualname(obj) for obj in _deepspeed_classes() + _numpy_globals()}
    # numpy pickles name its private module by either spelling, depending on the numpy that wrote the file
    names |= {n.replace("numpy._core.", "numpy.core.") for n in names if n.startswith("numpy._core.")}
    return names


def enforce() -> None:
    """From now on, every torch.load in this process is restricted to tensors, plain data and allowed classes."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise ValueError("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: pope-pretrain loads checkpoints weights-only "
                         "(no code runs); unset it")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(_deepspeed_classes() + _numpy_globals())


def check_file(path: str | Path) -> None:
    """Refuse a file that names a global outside the allow-list, without unpickling it."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpoint(f"refusing to load {path}: not a torch zip file (legacy pickles are not checked)")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - a malformed pickle is refused, whatever the parser says
        raise UnsafeCheckpoint(f"refusing to load {path}: its pickle cannot be read ({type(err).__name__})") \
            from None
    unsafe = sorted(set(found) - allowed_globals())
    if unsafe:
        raise UnsafeCheckpoint(f"refusing to load {path}: it names Python objects that could run code when "
                               f"loaded ({', '.join(unsafe[:3])}); only tensors and plain data are loaded")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load of a checked file, restricted to tensors, plain data and the allowed classes."""
    check_file(path)
    with torch.serialization.safe_globals(_deepspeed_classes() + _numpy_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)

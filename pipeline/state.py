"""What a run carries between the loop and its checkpoints, typed: who the run is, and where its training stands.

On disk they stay plain data, in the formats existing checkpoints hold: `RunIdentity.to_dict()` is COMPLETE.json's
"identity" (pipeline/checkpoint.py), `TrainState.to_client_state()` the client state DeepSpeed saves beside the
weights. Records of older versions may lack keys; pipeline/checkpoint.py compares only the keys a record has.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a resume must match: the checkpoints of a run are refused by a run that differs in any of these."""

    model: dict[str, Any]  # pipeline.config.model_identity of the resolved model config
    dataset: str  # the manifest hash of the data trained on
    world_size: int  # ZeRO partitions the optimizer state per process
    zero_stage: int
    windows_per_sample: int  # the saved data position counts windows (pipeline/data.py)
    init: dict[str, Any] | None  # pipeline.init_from.identity: where the weights were asked to come from

    def to_dict(self) -> dict[str, Any]:
        """COMPLETE.json's "identity", with the keys (and their order) checkpoints have always recorded."""
        return {"model": self.model, "dataset": self.dataset, "world_size": self.world_size,
                "zero_stage": self.zero_stage, "windows_per_sample": self.windows_per_sample, "init": self.init}


@dataclasses.dataclass
class TrainState:
    """Where training stands after `step` optimizer steps; the loop advances it, checkpoints save and restore it."""

    step: int = 0
    tokens_seen: int = 0  # positions computed, padding included
    loader: dict[str, Any] | None = None  # the StreamingDataLoader's state_dict (the data position)

    def to_client_state(self) -> dict[str, Any]:
        """DeepSpeed's client_state: the keys every checkpoint of this program holds."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.loader}

    @classmethod
    def from_client_state(cls, client_state: Mapping[str, Any]) -> "TrainState":
        """The state a checkpoint's client_state records (DeepSpeed's own keys beside them are ignored)."""
        return cls(step=int(client_state["step"]), tokens_seen=int(client_state["tokens_seen"]),
                   loader=client_state["loader"])

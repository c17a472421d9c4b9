"""Where a run is: :class:`TrainState`, saved in every checkpoint (``trainer_state.json``) and checked, key by key,
when a checkpoint is read back (a state of the wrong shape is a damaged checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where the run is (saved in every checkpoint)."""

    phase: int = 0
    step: int = 0  # optimiser steps done in this phase
    epoch_in_phase: int = 0
    phase_done: bool = False
    data_epoch: int = 0
    data_index: int = 0
    total_steps: int = 0
    best_score: float | None = None  # the best validation score of the current phase
    pending_eval: bool = False  # the checkpoint was taken before the validation of its step
    phase_closed: bool = False  # after phase_done: its validation, record and export are done (a resume goes on)
    until: dict = field(default_factory=dict)  # the phase's end criterion (common.phases.phase_end.PhaseEnd state)
    window: dict = field(default_factory=dict)  # the open log window's loss sums over every rank, and "_n"

    @classmethod
    def from_dict(cls, data) -> "TrainState":
        """The state a checkpoint saved (``asdict`` of one; a key added since may be absent: its default).

        Raises:
            ValueError: ``data`` is not a mapping of this class's fields with values of their types (what is wrong,
                by key).
        """
        if not isinstance(data, dict):
            raise ValueError(f"its state is a {type(data).__name__}, not a mapping")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"its state has unknown key(s) {', '.join(map(str, unknown))}")
        for key, value in data.items():
            kinds, words = _STATE_TYPES[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
                raise ValueError(f"its state's {key} is {shown}, not {words}")
        return cls(**data)

    def progress(self, iteration_based: bool) -> int:
        """How far the phase is in its own unit: optimiser steps in an iteration-based phase, epochs otherwise
        (what its end criteria count and its checkpoints' tags hold)."""
        return self.step if iteration_based else self.epoch_in_phase


_COUNT, _FLAG = ((int,), "a whole number"), ((bool,), "true or false")
# TrainState's fields: what a saved value may be (a bool is no count), in words
_STATE_TYPES = {"phase": _COUNT, "step": _COUNT, "epoch_in_phase": _COUNT, "phase_done": _FLAG, "data_epoch": _COUNT,
                "data_index": _COUNT, "total_steps": _COUNT, "best_score": ((int, float, type(None)), "a number or null"),
                "pending_eval": _FLAG, "phase_closed": _FLAG, "until": ((dict,), "a mapping"),
                "window": ((dict,), "a mapping")}

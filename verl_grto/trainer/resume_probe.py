"""What a resumed GRTO run holds, written in its checkpoint's own format (for the kill tests).

A resume is correct when the processes hold exactly what the checkpoint holds: the step counter,
the policy (weights, optimizer, its RNG and scheduler), the tool (weights, optimizer, step, RNG) and
the dataloader's position. Those live in the actor's and the tool's Ray workers, so the only faithful
way to see them is to have the workers save them again, right after loading, with the same save
calls a checkpoint uses. Called through :func:`verl_grto.faults.dump_after_resume` (a no-op unless
``VERL_GRTO_RESUME_PROBE`` is set); tests/test_e2e_kill.py compares the two tensor by tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def save_resumed_state(trainer: Any, out: str) -> None:
    """Write ``trainer``'s state as just resumed under ``out``: ``tool/`` (the tool's checkpoint
    files), ``actor/`` (verl's actor checkpoint), ``data.pt`` (dataloader state), ``step.json``."""
    os.makedirs(out, exist_ok=True)
    trainer.tool_wg.tool_save(os.path.join(out, "tool"))
    trainer.actor_rollout_wg.save_checkpoint(
        os.path.join(out, "actor"), None, trainer.global_steps, max_ckpt_to_keep=None
    )
    torch.save(trainer.train_dataloader.state_dict(), os.path.join(out, "data.pt"))
    with open(os.path.join(out, "step.json"), "w") as f:
        json.dump({"global_steps": int(trainer.global_steps)}, f)

"""Greedy answers of a policy checkpoint to dataset rows, batched, outside verl (evaluation, the CLI).

Why greedy: evaluation reports the policy's most likely answer, so a score does not depend on a
sampling seed. Prompts are built by :mod:`verl_grto.policy.inputs` exactly as in a rollout, and the
answer text is decoded as verl's reward manager decodes a response (up to the first end-of-sequence
token, special tokens skipped), so :func:`verl_grto.reward.answer.parse_answer` sees the same text
here as during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from verl_grto.policy.inputs import model_inputs, render_row
from verl_grto.policy.load import load_policy


class GreedyPolicy:
    """A vision-language policy loaded once; :meth:`answer` generates greedily for a batch of rows."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        adapter: str | Path | None = None,
    ) -> None:
        """``adapter``: a LoRA (PEFT) folder trained on ``path``, merged into the weights at load."""
        self.model, self.tokenizer, self.processor = load_policy(str(path), trust_remote_code, dtype, adapter)
        if self.processor is None:
            raise ValueError(f"{path} is a text-only model; the policy must be a vision-language model")
        self.model.to(device)
        self.device = torch.device(device)
        cfg = self.model.config
        self._image_token_id = getattr(cfg, "image_token_id", None)
        self._video_token_id = getattr(cfg, "video_token_id", None)
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self._eos_ids, default=0))

    def inputs(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Model inputs for the rows' prompts (left-padded to one batch)."""
        prompts, images = [], []
        for row in rows:
            ids, vision = render_row(row, self.processor)
            prompts.append(ids)
            images.append(vision)
        batch = model_inputs(
            prompts,
            images,
            self.processor,
            image_token_id=self._image_token_id,
            video_token_id=self._video_token_id,
            pad_token_id=self._pad_id,
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def answer(self, rows: Sequence[dict[str, Any]], max_new_tokens: int) -> list[str]:
        """The greedy response text to each row's prompt, in order."""
        if not rows:
            return []
        batch = self.inputs(rows)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self._pad_id)
        texts = []
        for tokens in out[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(tokens) if t in self._eos_ids), len(tokens))
            texts.append(self.tokenizer.decode(tokens[:end], skip_special_tokens=True))
        return texts

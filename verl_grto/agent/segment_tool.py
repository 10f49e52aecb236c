"""The segmentation tool as a verl tool: the policy calls SAM2 inside verl's multi-turn agent loop.

A ``BaseTool`` subclass for verl 0.9.1's ``ToolAgentLoop`` (``create`` / ``execute`` / ``release``,
``verl/tools/base_tool.py``), configured by the tool YAML shipped beside this module
(``segment_tool.yaml``, trained mode; ``segment_tool_frozen.yaml``, frozen mode), which also holds
the OpenAI function schema (:data:`TOOL_SCHEMA` is the same schema, used when a YAML gives none).

One call (:meth:`SegmentTool.execute`):

1. the arguments are checked (:func:`verl_grto.agent.calls.check_arguments`: the answers' rules, on
   the grid the policy answers on); a call past ``max_calls`` in the trajectory is refused too;
2. a valid prompt is mapped to the frame the mask is made in and segmented:
   * ``mode: trained`` -- on the tool's worker group that GRTO trains, through this job's
     :class:`~verl_grto.agent.router.ToolCallRouter` (the original image, read by the workers from the
     run's parquet files by the row's ``sample_id``): the masks come from the current weights;
   * ``mode: frozen`` -- a SAM2 checkpoint (``checkpoint``, a transformers SAM2 directory) loaded in
     the agent-loop worker itself, on the image the policy was shown: a plain verl tool, for pipelines
     without GRTO. Concurrent calls are batched (:class:`~verl_grto.batching.RequestBatcher`) in
     both modes;
3. the reply (:mod:`verl_grto.agent.reply`): the mask drawn on the image the policy was shown, and
   ``mask: area A of the image, box [x1, y1, x2, y2]`` on the policy's grid;
4. the call is recorded in ``agent_data.extra_fields[CALLS_KEY]`` (:class:`~verl_grto.agent.calls.CallRecord`:
   the prompt in the original frame, the mask as RLE), which becomes the trajectory's ``extra_fields``.

Bad arguments (malformed JSON, handed over by the ``grto_hermes`` parser; a box outside the image; an
empty box; too many calls) return a text error and the configured ``invalid_call_penalty`` as the
call's reward (verl appends it to ``tool_rewards``; the grto_agent trainer and
:func:`verl_grto.agent.reward.compute_score` subtract the recorded penalties). Nothing the policy writes
raises: the agent loop never sees an exception from this tool. A failure of the tool itself (the
router gone, a worker error) is recorded as ``failed`` with no penalty and logged; the grto_agent
trainer stops the run on it rather than train on masks that were never made.

Per-row settings come from ``extra_info.tools_kwargs.segment.create_kwargs`` (:mod:`verl_grto.agent.data`
writes them): ``sample_id`` (trained mode: whose image), ``image_size`` ``[H, W]`` (the original image,
the frame recorded prompts are in) and optionally ``answer_coords``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import numpy as np
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from verl_grto.agent import loop as _loop  # noqa: F401  (registers grto_tool_agent and grto_hermes in this process)
from verl_grto.agent.calls import CALLS_KEY, FAILED, INVALID, CallFrame, CallRecord, check_arguments
from verl_grto.agent.reply import reply_image, reply_text, resize_mask
from verl_grto.batching import RequestBatcher
from verl_grto.data.frame import PIXELS
from verl_grto.data.masks import decode_rle, encode_rle, mask_to_box
from verl_grto.reward.answer import ToolPrompt

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

#: The tool's OpenAI function schema (also in the shipped YAMLs). verl keeps only ``type``,
#: ``description`` and ``enum`` of each property: the shapes are enforced by the tool itself.
TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "segment",
        "description": (
            "Segment one object of the image with SAM2 and show the mask drawn on the image. "
            "Coordinates are those of your answers."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "bbox": {"type": "array", "description": "the object's box [x1, y1, x2, y2]"},
                "points": {"type": "array", "description": "optional points on the object, [[x, y], ...]"},
                "negative_points": {
                    "type": "array",
                    "description": "optional points on the background, [[x, y], ...]",
                },
            },
            "required": ["bbox"],
        },
    },
}
MODES = ("trained", "frozen")


@dataclass(frozen=True)
class SegmentToolConfig:
    """The tool YAML's ``config`` section (verl's ``type: native`` key aside).

    ``mode``: ``trained`` (the tool GRTO trains, through the router) or ``frozen`` (``checkpoint``
    loaded here). ``answer_coords``: the policy's convention when a row names none. ``max_calls``: calls
    a trajectory may make (later ones are refused). ``invalid_call_penalty``: what an invalid call costs.
    ``reply_max_pixels``: the reply image's size limit (None: the shown image's size). ``max_batch``:
    calls per batch. ``device``: where a frozen checkpoint runs. ``mask_threshold``: a frozen tool's logit
    threshold."""

    mode: str = "trained"
    checkpoint: str | None = None
    answer_coords: str = PIXELS
    max_calls: int = 3
    invalid_call_penalty: float = 0.05
    reply_max_pixels: int | None = None
    max_batch: int = 64
    device: str = "cpu"
    mask_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"segment tool: mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "frozen" and not self.checkpoint:
            raise ValueError("segment tool: mode frozen needs `checkpoint` (a transformers SAM2 directory)")
        if self.max_calls < 1:
            raise ValueError(f"segment tool: max_calls must be >= 1, got {self.max_calls}")
        if not 0 <= self.invalid_call_penalty < float("inf"):
            raise ValueError(
                f"segment tool: invalid_call_penalty must be finite and >= 0, got {self.invalid_call_penalty}"
            )

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> SegmentToolConfig:
        known = {k: v for k, v in raw.items() if k != "type"}
        unknown = sorted(set(known) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"segment tool: unknown config keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**known)


class FrozenSegmenter:
    """A SAM2 checkpoint in this process: masks for (image, prompt) pairs, concurrent calls batched."""

    def __init__(self, checkpoint: str, device: str = "cpu", mask_threshold: float = 0.0, max_batch: int = 64) -> None:
        from verl_grto.tool.engine import ToolEngine, ToolEngineConfig
        from verl_grto.tool.model import SegmentationTool

        tool = SegmentationTool.from_pretrained(checkpoint, trainable="mask_decoder").to(device)
        self.engine = ToolEngine(tool, ToolEngineConfig(mask_threshold=mask_threshold, cache_bytes=256 << 20))
        self.batcher: RequestBatcher[tuple[str, np.ndarray, ToolPrompt], np.ndarray] = RequestBatcher(
            self._run, max_batch
        )

    async def segment(self, image: np.ndarray, prompt: ToolPrompt) -> np.ndarray:
        """The bool mask of ``prompt`` (pixels of ``image``, HxWx3 uint8) at the image's size."""
        key = "sha1:" + hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        return await self.batcher.submit((key, image, prompt))

    async def _run(self, requests: list[tuple[str, np.ndarray, ToolPrompt]]) -> list[np.ndarray]:
        return await asyncio.get_running_loop().run_in_executor(None, self._predict, requests)

    def _predict(self, requests: list[tuple[str, np.ndarray, ToolPrompt]]) -> list[np.ndarray]:
        from verl_grto.tool.engine import ToolBatch

        position: dict[str, int] = {}
        images: list[np.ndarray] = []
        for key, image, _ in requests:
            if key not in position:
                position[key] = len(images)
                images.append(image)
        batch = ToolBatch(
            image_keys=list(position),
            images=images,
            image_index=[position[k] for k, _, _ in requests],
            prompts=[[p] for _, _, p in requests],
        )
        pred = self.engine.predict(batch, return_masks=True)
        return [m.numpy().astype(bool) for m in pred.masks]  # type: ignore[union-attr]


class SegmentTool(BaseTool):
    """verl tool ``segment`` (see the module docstring)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None) -> None:
        self.settings = SegmentToolConfig.from_config(config or {})
        super().__init__(config, tool_schema)
        self._instances: dict[str, dict[str, Any]] = {}
        self._frozen: FrozenSegmenter | None = None
        self._router: Any = None

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return OpenAIFunctionToolSchema.model_validate(TOOL_SCHEMA)

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        self._instances[instance_id] = dict(kwargs.get("create_kwargs") or {})
        return instance_id, ToolResponse()

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict]:
        """One call; never raises (the reply, the call's reward: 0 or minus the penalty, and metrics)."""
        agent_data = kwargs.get("agent_data")
        extra = getattr(agent_data, "extra_fields", None)
        records: list[dict[str, Any]] = extra.setdefault(CALLS_KEY, []) if isinstance(extra, dict) else []
        index = len(records)
        raw = _raw_text(parameters)
        try:
            response, record = await self._call(instance_id, parameters, agent_data, index, raw)
        except Exception as exc:  # noqa: BLE001  (the tool's own failure: recorded, logged, never raised)
            logger.error("segment tool: call %d failed: %s: %s", index, type(exc).__name__, exc)
            record = CallRecord(index=index, kind=FAILED, error=f"{type(exc).__name__}: {exc}"[:300], arguments=raw)
            response = ToolResponse(text="error: the segmentation tool failed on this call")
        records.append(record.as_dict())
        return response, (-float(record.penalty) if record.penalty else 0.0), {"kind": record.kind}

    async def _call(
        self, instance_id: str, parameters: Any, agent_data: Any, index: int, raw: str
    ) -> tuple[ToolResponse, CallRecord]:
        cfg = self.settings
        images = list(getattr(agent_data, "image_data", None) or [])
        if not images:
            raise RuntimeError("the trajectory has no image (agent_data.image_data is empty)")
        shown = images[0]
        frame = CallFrame.from_kwargs(self._instances.get(instance_id), shown.size, cfg.answer_coords)
        if index >= cfg.max_calls:
            error = f"too many calls: at most {cfg.max_calls} per answer; answer now"
            return self._invalid(index, error, raw)
        prompt, error = check_arguments(parameters, frame)
        if prompt is None:
            return self._invalid(index, error, raw)
        prompt_shown = frame.to_shown(prompt)
        record = CallRecord.of_prompt(index, frame.to_image(prompt), raw)
        if cfg.mode == "frozen":
            mask_shown = await self._frozen_segmenter().segment(np.asarray(shown.convert("RGB")), prompt_shown)
            mask_image = resize_mask(mask_shown, frame.image_hw)
        else:
            sample_id = (self._instances.get(instance_id) or {}).get("sample_id")
            if sample_id is None:
                raise ValueError("trained mode needs extra_info.tools_kwargs.segment.create_kwargs.sample_id")
            from verl_grto.agent.router import SegmentRequest

            result = await (await self._router_handle()).segment.remote(
                SegmentRequest(str(sample_id), record.prompt())  # type: ignore[arg-type]
            )
            mask_image = decode_rle(result.mask_rle)
            mask_shown = resize_mask(mask_image, frame.shown_hw)
        record.mask_rle = encode_rle(mask_image)
        record.area_fraction = float(mask_image.mean())
        record.mask_box = mask_to_box(mask_image)
        picture = reply_image(shown, mask_shown, prompt_shown, cfg.reply_max_pixels)
        return ToolResponse(text=reply_text(mask_shown, frame), image=[picture]), record

    def _invalid(self, index: int, error: str, raw: str) -> tuple[ToolResponse, CallRecord]:
        record = CallRecord(
            index=index, kind=INVALID, error=error, penalty=self.settings.invalid_call_penalty, arguments=raw
        )
        return ToolResponse(text=f"error: {error}"), record

    def _frozen_segmenter(self) -> FrozenSegmenter:
        if self._frozen is None:  # loaded at the first call: verl builds every tool at worker start
            cfg = self.settings
            self._frozen = FrozenSegmenter(str(cfg.checkpoint), cfg.device, cfg.mask_threshold, cfg.max_batch)
        return self._frozen

    async def _router_handle(self) -> Any:
        if self._router is None:
            import ray

            from verl_grto.agent.router import router_name

            advice = "mode `trained` needs trainer mode grto_agent (which starts it); without GRTO use mode `frozen`"
            # the job id and ray.get_actor would start a local cluster in a process outside a Ray job (a later
            # ray.init there then fails): such a process has no router by definition
            if not ray.is_initialized():
                raise RuntimeError(f"no tool router: this process is not in a Ray job; {advice}")
            name = router_name()
            try:
                self._router = ray.get_actor(name)
            except ValueError:
                raise RuntimeError(f"no tool router {name!r} in this Ray job; {advice}") from None
        return self._router


def _raw_text(parameters: Any) -> str:
    """The arguments as the policy wrote them, for the record (cut)."""
    try:
        return json.dumps(parameters)[:200]
    except (TypeError, ValueError):
        return repr(parameters)[:200]

"""verl's own multi-turn agent loop, in this process, with the ``hf`` rollout server as its model.

Why: the tiny multi-turn policy's warm start is probed, and the tool is tested, through the loop that
training runs (``GRTOToolAgentLoop``, i.e. verl's ``ToolAgentLoop``: the same prompt rendering, tool-call
parsing, tool replies and token masks), not a re-implementation of it. The server is
:class:`~verl_grto.rollout.hf_server.HFRolloutServer` used as a plain object (its ``generate`` has the
signature verl's server manager calls), the tools are built from a verl tool YAML by verl's own
``initialize_tools_from_config``. No Ray, no trainer: one process, for probes and tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from verl_grto.agent.loop import PARSER_NAME, GRTOToolAgentLoop
from verl_grto.data.frame import resize_keys
from verl_grto.data.images import row_images
from verl_grto.policy.inputs import build_messages


def agent_config(
    prompt_length: int, response_length: int, max_assistant_turns: int | None = None, parser: str = PARSER_NAME
) -> Any:
    """The part of verl's trainer config a ``ToolAgentLoop`` reads (rollout lengths and ``multi_turn``)."""
    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {
                    "prompt_length": prompt_length,
                    "response_length": response_length,
                    "full_determinism": False,
                    "multi_turn": {
                        "max_user_turns": None,
                        "max_assistant_turns": max_assistant_turns,
                        "max_parallel_calls": 1,
                        "max_tool_response_length": 256,
                        "tool_response_truncate_side": "middle",
                        "format": parser,
                    },
                }
            },
            "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
        }
    )


def build_loop(
    server: Any,
    tokenizer: Any,
    processor: Any,
    tools: Sequence[Any],
    config: Any,
    loop_cls: type = GRTOToolAgentLoop,
    hf_model_type: str | None = "qwen2_5_vl",
) -> Any:
    """A verl agent loop (``loop_cls``, default ``GRTOToolAgentLoop``) over ``server`` (anything with verl's
    server ``generate``) and ``tools`` (verl tools), configured by :func:`agent_config`."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    return loop_cls(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=processor,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type=hf_model_type,
        tools=ToolListWrap(list(tools)),
    )


def load_tools(tool_config_path: str | Path) -> list[Any]:
    """The tools of a verl tool YAML, built by verl's own loader."""
    from verl.tools.tool_registry import initialize_tools_from_config

    return initialize_tools_from_config(str(tool_config_path))


def row_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """What verl's dataset hands an agent loop for a row of the project's format (``raw_prompt`` with its
    image parts, ``tools_kwargs``, ``extra_info``)."""
    keys = [resize_keys(entry) for entry in row.get("images") or []]
    extra = dict(row.get("extra_info") or {})
    return {
        "raw_prompt": build_messages(row["prompt"], row_images(row), keys),
        "tools_kwargs": extra.get("tools_kwargs") or {},
        "extra_info": extra,
    }


def run_rows(loop: Any, rows: Sequence[dict[str, Any]], sampling_params: dict[str, Any], n: int = 1) -> list[Any]:
    """Run ``loop`` on every row ``n`` times, all concurrently (as verl's agent-loop worker does); returns
    the ``AgentLoopOutput``s, row by row."""

    async def main() -> list[Any]:
        tasks = [loop.run(dict(sampling_params), **row_kwargs(row)) for row in rows for _ in range(n)]
        return list(await asyncio.gather(*tasks))

    return loop.loop.run_until_complete(main())  # the event loop verl's AgentLoopBase was built on


def turns(output: Any) -> list[tuple[int, list[int]]]:
    """The response of an ``AgentLoopOutput`` as runs of equal ``response_mask``: ``(mask, token ids)`` in
    order (1: the policy's tokens, 0: tool replies and chat scaffolding)."""
    runs: list[tuple[int, list[int]]] = []
    for token, mask in zip(output.response_ids, output.response_mask, strict=True):
        if runs and runs[-1][0] == int(mask):
            runs[-1][1].append(int(token))
        else:
            runs.append((int(mask), [int(token)]))
    return runs

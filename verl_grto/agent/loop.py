"""verl's ``ToolAgentLoop`` with the two things the segmentation tool needs of it, registered by name.

* ``grto_hermes`` (``actor_rollout_ref.rollout.multi_turn.format``): verl's ``hermes`` parser
  (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), except that a ``<tool_call>`` whose
  JSON does not parse is not dropped: verl's parser logs it and the trajectory ends as if the policy had
  answered (``verl/experimental/agent_loop/tool_parser.py:111-121``), so the policy would never read
  what it got wrong. Here it becomes a call of the named tool (the only tool, when the name cannot be
  read) whose arguments carry the raw text under :data:`~verl_grto.agent.calls.MALFORMED_KEY`; the
  segmentation tool answers it with an error and its penalty.
* ``grto_tool_agent`` (a dataset's ``agent_name``): ``ToolAgentLoop`` whose output always holds
  ``extra_fields[CALLS_KEY]`` (an empty list when the policy never called the tool): ``DataProto.concat``
  across agent-loop workers asserts that every sample has the same keys (``verl/protocol.py:914-931``),
  and a worker whose samples never called the tool would otherwise lack the key.

verl's own ``tool_agent`` and ``hermes`` work with the tool too (docs/recipes.md, "Add the segmentation
tool to your verl pipeline"), without these two guarantees.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import regex
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, HermesToolParser, ToolParser
from verl.utils.ray_utils import get_event_loop

from verl_grto.agent.calls import CALLS_KEY, MALFORMED_KEY, TOOL_NAME

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

PARSER_NAME = "grto_hermes"
AGENT_NAME = "grto_tool_agent"
_NAME = regex.compile(r'"name"\s*:\s*"([^"]+)"')


def parse_tool_calls(text: str, tool_names: list[str]) -> tuple[str, list[FunctionCall]]:
    """The content and the calls of a decoded response (hermes format, malformed calls kept).

    A ``<tool_call>`` body that is not a JSON object with ``name`` and ``arguments`` becomes a call of
    the name it mentions (else the only tool of ``tool_names``, else :data:`TOOL_NAME`) with arguments
    ``{MALFORMED_KEY: body}``."""
    start, end = "<tool_call>", "</tool_call>"
    if start not in text or end not in text:
        return text, []
    pattern = regex.compile(r"<tool_call>(.*?)</tool_call>", regex.DOTALL)
    calls = []
    for body in pattern.findall(text):
        try:
            obj = json.loads(body)
            name, arguments = obj["name"], obj["arguments"]
            if not isinstance(name, str):
                raise TypeError(f"name is {type(name).__name__}")
            calls.append(FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))
        except Exception:  # noqa: BLE001  (any malformed body is the policy's to read about)
            named = _NAME.search(body)
            name = named.group(1) if named else (tool_names[0] if len(tool_names) == 1 else TOOL_NAME)
            calls.append(FunctionCall(name=name, arguments=json.dumps({MALFORMED_KEY: body.strip()[:200]})))
    return pattern.sub("", text), calls


@ToolParser.register(PARSER_NAME)
class LenientHermesToolParser(HermesToolParser):
    """``hermes``, with malformed calls handed to the tool (:func:`parse_tool_calls`)."""

    async def extract_tool_calls(self, responses_ids: list[int], tools: Any = None) -> tuple[str, list[FunctionCall]]:
        text = await get_event_loop().run_in_executor(None, self.tokenizer.decode, responses_ids)
        names = [t.function.name for t in tools or []]
        return parse_tool_calls(text, names)


@register(AGENT_NAME)
class GRTOToolAgentLoop(ToolAgentLoop):
    """verl's ``ToolAgentLoop``; every output holds ``extra_fields[CALLS_KEY]``."""

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any) -> AgentLoopOutput:
        output = await super().run(sampling_params, priority=priority, **kwargs)
        output.extra_fields.setdefault(CALLS_KEY, [])
        return output

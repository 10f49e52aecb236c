"""Segmentation as a verl tool call: the policy calls SAM2 inside verl's multi-turn agent loop.

``calls`` (arguments, frames, the record each call leaves), ``segment_tool`` (the verl ``BaseTool``),
``loop`` (the ``grto_tool_agent`` loop and ``grto_hermes`` parser), ``router`` (the tool GRTO trains,
reached from the agent-loop workers through Ray), ``reply``, ``templates``, ``data``
(the dataset fields) and ``reward`` (a reward for pipelines without GRTO). docs/recipes.md, "Add the
segmentation tool to your verl pipeline"; docs/method.md, "Multi-turn: the tool as a call".
"""

"""The two dataset fields that route a row through the tool-calling agent loop with the segmentation tool.

verl picks a row's agent loop from its ``agent_name`` column (else ``rollout.agent.default_agent_loop``)
and hands each tool ``extra_info.tools_kwargs[<tool name>]["create_kwargs"]`` when a call creates it
(``verl/experimental/agent_loop/tool_agent_loop.py:484-496``; ``RLHFDataset`` copies ``tools_kwargs``
out of ``extra_info``). For the segmentation tool those are (:func:`tool_fields`)::

    agent_name: grto_tool_agent
    extra_info.tools_kwargs.segment.create_kwargs:
        sample_id: <extra_info.sample_id>   # trained mode: whose image the tool's workers segment
        image_size: [H, W]                  # the original image: the frame recorded prompts are in
        answer_coords: pixels | norm1000    # the policy's convention for this row

:func:`add_tool_fields` writes a copy of a parquet file of the project's row format with them
(``verl-grto data add-tool``; the recipes' ``${grto_agent_data:FILE}`` resolver), row group by row group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from verl_grto.agent.calls import TOOL_NAME
from verl_grto.agent.loop import AGENT_NAME
from verl_grto.atomic import build_dir_once
from verl_grto.data.parquet import AtomicParquetWriter
from verl_grto.data.schema import GroundTruth

#: Bump when :func:`tool_fields` changes, so copies made by :func:`ensure_agent_data` are rebuilt.
AGENT_DATA_VERSION = 1


def tool_fields(record: dict[str, Any], agent_name: str = AGENT_NAME, tool_name: str = TOOL_NAME) -> dict[str, Any]:
    """``record`` (a row of the project's format) with ``agent_name`` and ``extra_info.tools_kwargs`` set."""
    extra = dict(record.get("extra_info") or {})
    if "sample_id" not in extra:
        raise ValueError("the row has no extra_info.sample_id (the tool's workers find its image by it)")
    gt = GroundTruth.from_row(record["reward_model"]["ground_truth"], extra)
    create = {
        "sample_id": str(extra["sample_id"]),
        "image_size": list(gt.image_size),
        "answer_coords": gt.answer_coords,
    }
    extra["tools_kwargs"] = {tool_name: {"create_kwargs": create}}
    return {**record, "agent_name": agent_name, "extra_info": extra}


def add_tool_fields(src: Path | str, dst: Path | str, agent_name: str = AGENT_NAME, tool_name: str = TOOL_NAME) -> int:
    """Copy ``src`` to ``dst`` with :func:`tool_fields` on every row; returns the rows written. ``dst``
    appears only when complete; a row that cannot be read raises ValueError naming it."""
    source = pq.ParquetFile(src)
    written = 0
    with AtomicParquetWriter(dst) as writer:
        for group in range(source.num_row_groups):
            for row in source.read_row_group(group).to_pylist():
                try:
                    writer.write(tool_fields(row, agent_name, tool_name))
                except (KeyError, ValueError, TypeError) as exc:
                    raise ValueError(f"{src}: row {written}: {exc}") from None
                written += 1
    return written


def ensure_agent_data(src: Path | str) -> Path:
    """A copy of ``src`` with the tool fields, beside it (``agent_<stem>/<name>``), made once (atomically,
    under a file lock); returns its path."""
    src = Path(src)
    target = src.parent / f"agent_{src.stem}"
    stamp = {"builder": "agent_rows", "version": AGENT_DATA_VERSION, "agent_name": AGENT_NAME, "tool": TOOL_NAME}
    build_dir_once(target, stamp, lambda tmp: add_tool_fields(src, Path(tmp) / src.name) and None)
    return target / src.name


def tool_field_problems(path: Path | str, tool_name: str = TOOL_NAME, limit: int = 5) -> list[str]:
    """``file:row: reason`` for the first ``limit`` rows of ``path`` without the tool fields (an ``agent_name``,
    and ``extra_info.tools_kwargs.<tool>.create_kwargs`` naming the row's ``sample_id``); [] when every row
    has them. Reads two columns, row group by row group."""
    source = pq.ParquetFile(path)
    if "agent_name" not in source.schema_arrow.names:
        return [f"{path}: no agent_name column (convert it: verl-grto data add-tool --src {path} --out ...)"]
    problems: list[str] = []
    row = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group, columns=["agent_name", "extra_info"])
        for agent, extra in zip(
            table.column("agent_name").to_pylist(), table.column("extra_info").to_pylist(), strict=True
        ):
            create = (((extra or {}).get("tools_kwargs") or {}).get(tool_name) or {}).get("create_kwargs") or {}
            if not agent:
                problems.append(f"{path}:{row}: empty agent_name")
            elif create.get("sample_id") != (extra or {}).get("sample_id"):
                problems.append(
                    f"{path}:{row}: extra_info.tools_kwargs.{tool_name}.create_kwargs.sample_id is not the row's"
                )
            row += 1
            if len(problems) >= limit:
                return problems
    return problems

"""BTO (bootstrapped tool optimisation), the first stage of B-GRTO (docs/method.md): a rollout buffer
from the reference policy, then off-policy tool training on it.

Why a stage of its own: GRTO's first rewards come from the tool, and a tool that has never seen what
the policy asks (boxes a little off, points on the edge) gives poor rewards to good answers. BTO
samples G answers per training prompt from the reference policy mu *once*, stores them on disk, and
trains the tool on them for K epochs with no policy update, so GRTO starts from an adapted tool.

Three modules, each usable alone (the verl trainer mode wires them, generation through verl's rollout
servers):

* :mod:`.buffer`: :class:`~.buffer.RolloutBuffer`, the rollouts as parquet (one row per rollout,
  pandas-readable) plus a JSON sidecar (reference policy, G, seed, sampling settings, creation
  time). Parts are written atomically while the buffer is built, so a crash keeps what was generated.
* :mod:`.build`: :func:`~.build.build_buffer`, G answers per dataset row from a pluggable
  ``generate_fn``, parsed with :func:`~verl_grto.reward.answer.parse_answer`; resumable.
  :func:`~.build.hf_generate_fn` is a CPU / test ``generate_fn`` backed by the ``hf`` rollout server
  itself.
* :mod:`.train`: :func:`~.train.train_tool_on_buffer`, K epochs of :meth:`ToolEngine.update` over the
  buffer, each image's rollouts in one batch; image features are cached for the whole stage (the
  encoder is frozen) in a cache bounded in bytes: each image is encoded once when the buffer's
  features fit, and otherwise at most once per epoch (the epoch order starts with what the cache still
  holds, :func:`~.train.epoch_order`); ``uniform`` or
  ``importance`` weights (:mod:`verl_grto.algorithm.tool_weights`), unparseable rollouts weight 0;
  checkpoints every M batches and at each epoch end, so an interrupted stage resumes where it
  stopped (bit-exact on CPU). :class:`~.train.BTORequest` runs it in the tool's verl workers, one
  data-parallel shard per rank.

This file holds only what building and training share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

#: Seconds between progress-bar refreshes: inside a Ray worker every refresh is a line of the run's
#: console (the BTO tool bar alone printed 390 lines of a 1848-line main job).
PROGRESS_INTERVAL_S = 10.0


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

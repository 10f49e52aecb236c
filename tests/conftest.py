"""Shared fixtures. Tests run on a shared 2-core machine: torch is kept to one thread."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from verl_grto.assets.build import AssetPaths

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> AssetPaths:
    """The tiny policy and tool, built once per test session in a private cache (never in ~/.cache)."""
    from verl_grto.assets.build import ensure_assets  # imported here: transformers is slow to import

    return ensure_assets(root=tmp_path_factory.mktemp("assets"), seed=0)


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory: pytest.TempPathFactory):
    """One VERL_GRTO_HOME for every end-to-end run of the session: the tiny assets (and the warm-started
    policy, the pre-trained tool) are built once, in a private cache, never in ~/.cache.

    ``VERL_GRTO_E2E_HOME`` names an existing home to reuse instead (re-running one e2e test locally
    without rebuilding the assets); CI leaves it unset."""
    reuse = os.environ.get("VERL_GRTO_E2E_HOME")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("grto_home")


@pytest.fixture(autouse=True)
def _no_ray_left_behind(request: pytest.FixtureRequest):
    """Fails the test that leaves Ray connected in the pytest process (``ray.get_actor`` or ``ray.get``
    outside a Ray job silently starts a local cluster), instead of a later module's ``ray.init``.

    Tests that own a cluster through the ``local_ray`` fixture are exempt while they hold it."""
    yield
    import sys

    ray = sys.modules.get("ray")  # never imported by this check: most unit tests do not load Ray
    if ray is None or "local_ray" in request.fixturenames or not ray.is_initialized():
        return
    ray.shutdown()
    pytest.fail(f"{request.node.nodeid} left Ray initialized in the test process; a later ray.init would fail")

"""The 2-node test's port choice (tests/e2e_helpers.py): no port handed to two Ray components.

Choosing ports one socket at a time let the kernel return the same port twice, and a node refused
to start (`dashboard_agent_grpc` and `dashboard_agent_http` both on 52415, in a CI-time run)."""

from __future__ import annotations

import shutil

from e2e_helpers import LocalRayCluster, free_ports


def test_free_ports_are_distinct_and_skip_the_excluded():
    first = free_ports(64)
    assert len(set(first)) == 64
    again = free_ports(64, exclude=set(first))
    assert len(set(again)) == 64 and not set(first) & set(again)


def test_a_cluster_never_hands_out_a_port_twice():
    cluster = LocalRayCluster({})
    try:
        head, node = cluster._ports(8), cluster._ports(8)
        gcs = int(cluster.address.rsplit(":", 1)[1])
        assert len({gcs, *head, *node}) == 17
    finally:
        shutil.rmtree(cluster.temp_dir)

"""The route's retry `host_selection_retry_max_attempts` reaches the balancer's re-picks (issue 9,
item 12): `Balancer.pick(book, exclude, attempts)` for every balancer kind and wrapper, and
`ClusterState.pick(exclude, h, attempts)` for balanced and consistent-hash clusters."""
import random

import pytest

from meshcore.config.compile import compile_sources
from meshcore.shm.layout import Layout
from meshcore.shm.segment import Segment
from meshcore.upstream.balancer import make_balancer
from meshcore.upstream.cluster import ClusterState

KINDS = ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"]


class Idle:
    def rq_active(self, ep):
        return 0


def _fresh(kind, weights, seed, default=5):
    return make_balancer(kind, weights, random.Random(seed),
                         host_selection_retry_max_attempts=default)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [1, 2, 3, 4]])
@pytest.mark.parametrize("attempts", [0, 1, 2, 7])
def test_attempts_bounds_the_repicks_whatever_the_balancers_default(kind, weights, attempts):
    """Excluding every host: exactly 1 + attempts picks are made, the last one is returned."""
    for seed in range(5):
        b = _fresh(kind, weights, seed)
        twin = _fresh(kind, weights, seed)
        expected = [twin.pick(Idle()) for _ in range(1 + attempts)][-1]
        assert b.pick(Idle(), {0, 1, 2, 3}, attempts) == expected
        assert b.pick(Idle()) == twin.pick(Idle())  # both advanced by exactly 1 + attempts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attempts", [None, -1])
def test_without_attempts_the_balancers_default_applies(kind, attempts):
    b, twin = _fresh(kind, [1, 1, 1], 3, default=2), _fresh(kind, [1, 1, 1], 3, default=2)
    args = () if attempts is None else (attempts,)
    assert b.pick(Idle(), {0, 1, 2}, *args) == [twin.pick(Idle()) for _ in range(3)][-1]


MESH = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: 1001}}
  - {address: 127.0.0.2, ports: {http: 1001}}
  - {address: 127.0.0.3, ports: {http: 1001}}
  - {address: 127.0.0.4, ports: {http: 1001}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy:
    loadBalancer: %s
"""


@pytest.fixture
def segment():
    seg = Segment.create(Layout(max_hosts=8, max_clusters=2, workers=1))
    yield seg
    seg.unlink()
    seg.close()


def _state(segment, lb: str, seed: int) -> ClusterState:
    snap = compile_sources({"mesh.yaml": (MESH % lb).encode()})
    policy = snap.clusters["outbound|80||svc"]
    return ClusterState(policy, random.Random(seed), segment, 0, (0, (0, 1, 2, 3)))


@pytest.mark.parametrize("lb", ["{simple: ROUND_ROBIN}", "{simple: LEAST_REQUEST}",
                                "{simple: RANDOM}"])
@pytest.mark.parametrize("attempts", [0, 1, 3])
def test_cluster_state_passes_attempts_to_its_balancer(segment, lb, attempts):
    for seed in range(4):
        st, twin = _state(segment, lb, seed), _state(segment, lb, seed)
        expected = [twin.pick(None) for _ in range(1 + attempts)][-1]
        assert st.pick({0, 1, 2, 3}, None, attempts) == expected


@pytest.mark.parametrize("attempts", [0, 1, 4])
def test_cluster_state_passes_attempts_to_the_hash_ring(segment, attempts):
    """Ring hash: attempt k walks the ring from the key's hash k times (Envoy's chooseHost)."""
    lb = "{consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 64}}}"
    st = _state(segment, lb, 0)
    h = 0x1234_5678_9ABC
    seq = [st.table.pick(h, k) for k in range(1 + attempts)]
    assert st.pick(set(range(4)), h, attempts) == seq[-1]
    first = seq[0]
    # excluding only the first host: the first different host within the allowed attempts
    others = [x for x in seq[1:] if x != first]
    assert st.pick({first}, h, attempts) == (others[0] if others else seq[-1])

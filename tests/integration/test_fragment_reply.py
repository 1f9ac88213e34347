"""A target with `#` is refused by both parsers with the reason "fragment in request target";
meshcore.local_reply.downstream_protocol_error(status, reason) maps that reason to Envoy's own
reply (400, empty body, no content-type, details path_normalization_failed), and the loop's
DConn.on_protocol_error passes it the parser's reason. Compared with Envoy 1.40 case by case.
"""
import pytest

from test_envoy_differential import FRAGMENT_CASES, _both, envoy  # noqa: F401


@pytest.mark.parametrize("name,raw", FRAGMENT_CASES, ids=[c[0] for c in FRAGMENT_CASES])
def test_fragment_reply_is_envoys(envoy, proxy, name, raw):  # noqa: F811
    (e, _), (m, _) = _both(envoy, proxy.port, raw)
    assert (m.status, m.body) == (e.status, e.body) == (400, b"")
    assert (m.header("content-type"), m.header("connection")) == (e.header("content-type"),
                                                                  e.header("connection"))

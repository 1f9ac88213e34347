"""Mirroring policy (meshcore.policy.mirror): Istio translation, draws, the -shadow authority."""
from __future__ import annotations

import msgspec
import pytest

from meshcore.config import istio
from meshcore.policy.mirror import head_authority, shadow_head
from meshcore.policy.mirror import (CAPTURE_HOST, DEFAULT_CAPTURE_FILE, HUNDRED, MILLION,
                                    CaptureSettings, MirrorPolicy, mirror_policies_from_istio,
                                    parse_size, shadow_authority, should_mirror)

ROUTE = [{"destination": {"host": "retry-service"}}]


def http(**fields):
    fields.setdefault("route", ROUTE)
    return msgspec.convert(fields, istio.HTTPRoute, dec_hook=istio.dec_hook)


def test_no_mirror():
    assert mirror_policies_from_istio(http()) == ((), [])


def test_mirror_without_percentage_is_100_percent():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": "sniffer"}))
    assert w == []
    assert p == MirrorPolicy(host="sniffer", numerator=MILLION, denominator=MILLION)
    assert p.shadow_suffix and not p.is_capture and p.percent == 100.0
    assert all(should_mirror(p, r) for r in (0, 1, 999_999, 10**9, 2**32 - 1))


def test_mirror_percentage_per_million_go_truncation():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": "sniffer"},
                                              mirrorPercentage={"value": 0.57}))
    assert w == [] and (p.numerator, p.denominator) == (5699, MILLION)
    (p,), _ = mirror_policies_from_istio(http(mirror={"host": "s"}, mirrorPercentage={"value": 50}))
    assert p.numerator == 500_000


def test_old_mirror_percent_per_hundred():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": "sniffer"}, mirror_percent=30))
    assert w == [] and (p.numerator, p.denominator) == (30, HUNDRED)
    assert should_mirror(p, 29) and not should_mirror(p, 30) and should_mirror(p, 129)


def test_mirror_percentage_wins_over_mirror_percent():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": "s"}, mirror_percent=30,
                                              mirrorPercentage={"value": 10}))
    assert (p.numerator, p.denominator) == (100_000, MILLION)
    assert [f for f, _ in w] == ["mirror_percent"]


@pytest.mark.parametrize("fields", [{"mirrorPercentage": {"value": 0}}, {"mirrorPercentage": {}},
                                    {"mirror_percent": 0}])
def test_explicit_zero_means_no_mirror(fields):
    assert mirror_policies_from_istio(http(mirror={"host": "sniffer"}, **fields)) == ((), [])


def test_mirror_percent_over_100_is_clamped_with_warning():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": "s"}, mirror_percent=250))
    assert (p.numerator, p.denominator) == (100, HUNDRED) and w[0][0] == "mirror_percent"


def test_tiny_percentage_is_dropped_with_warning():
    policies, w = mirror_policies_from_istio(http(mirror={"host": "s"},
                                                  mirrorPercentage={"value": 0.00001}))
    assert policies == () and w[0][0] == "mirrorPercentage"


def test_destination_subset_and_port():
    (p,), _ = mirror_policies_from_istio(http(mirror={"host": "myweb", "subset": "v2",
                                                      "port": {"number": 8080}}))
    assert (p.host, p.subset, p.port) == ("myweb", "v2", 8080)


def test_mirrors_list_each_with_own_percentage():
    r = http(mirrors=[{"destination": {"host": "a"}},
                      {"destination": {"host": "b"}, "percentage": {"value": 25}},
                      {"destination": {"host": "c"}, "percentage": {"value": 0}}])
    policies, w = mirror_policies_from_istio(r)
    assert w == []
    assert [(p.host, p.numerator, p.denominator) for p in policies] == [
        ("a", MILLION, MILLION), ("b", 250_000, MILLION)]


def test_mirror_and_mirrors_both_set_warns_and_applies_both():
    policies, w = mirror_policies_from_istio(http(mirror={"host": "a"},
                                                  mirrors=[{"destination": {"host": "b"}}]))
    assert [p.host for p in policies] == ["a", "b"] and [f for f, _ in w] == ["mirrors"]


def test_percentage_without_mirror_warns():
    policies, w = mirror_policies_from_istio(http(mirrorPercentage={"value": 5}))
    assert policies == () and [f for f, _ in w] == ["mirrorPercentage"]


def test_mirror_on_redirect_route_is_ignored():
    r = msgspec.convert({"redirect": {"uri": "/x"}, "mirror": {"host": "s"}}, istio.HTTPRoute)
    policies, w = mirror_policies_from_istio(r)
    assert policies == () and "redirect" in w[0][1]


def test_same_random_value_for_every_policy_like_envoy_stream_id():
    # Envoy uses the stream id for every policy: two 50 % mirrors fire on the same requests.
    policies, _ = mirror_policies_from_istio(http(mirrors=[
        {"destination": {"host": "a"}, "percentage": {"value": 50}},
        {"destination": {"host": "b"}, "percentage": {"value": 50}}]))
    for rnd in (0, 499_999, 500_000, 1_234_567, 2**32 - 1):
        assert should_mirror(policies[0], rnd) == should_mirror(policies[1], rnd)


def test_should_mirror_fraction():
    p = MirrorPolicy(host="s", numerator=250_000, denominator=MILLION)
    hits = sum(should_mirror(p, r) for r in range(0, 4_000_000, 997))
    assert abs(hits / len(range(0, 4_000_000, 997)) - 0.25) < 0.01
    assert not should_mirror(MirrorPolicy(host="s", numerator=0), 0)


def test_policy_validation():
    with pytest.raises(ValueError):
        MirrorPolicy(host="s", denominator=1000)
    with pytest.raises(ValueError):
        MirrorPolicy(host="s", numerator=101, denominator=HUNDRED)


# --- the -shadow host suffix ---------------------------------------------------------------------

@pytest.mark.parametrize("authority,expected", [
    (b"svc.local:8080", b"svc.local-shadow:8080"),
    (b"svc:8080", b"svc-shadow:8080"),
    (b"10.0.0.1:80", b"10.0.0.1-shadow:80"),
    (b"retry-service", b"retry-service-shadow"),
    (b"[::1]:80", b"[::1]-shadow:80"),
    (b"[::1]", b"[::1]-shadow"),
    (b"[fe80::1%25eth0]:8080", b"[fe80::1%25eth0]-shadow:8080"),
])
def test_shadow_authority(authority, expected):
    assert shadow_authority(authority) == expected


def test_shadow_suffix_annotation_and_override():
    r = http(mirror={"host": "sniffer"})
    (p,), w = mirror_policies_from_istio(r, {"meshcore.io/shadow-host-suffix": "false"})
    assert not p.shadow_suffix and w == []
    (p,), _ = mirror_policies_from_istio(r, {"meshcore.io/shadow-host-suffix": "false"},
                                         shadow_host_suffix=True)
    assert p.shadow_suffix
    (p,), _ = mirror_policies_from_istio(r, shadow_host_suffix="False")
    assert not p.shadow_suffix
    (p,), w = mirror_policies_from_istio(r, {"meshcore.io/shadow-host-suffix": "maybe"})
    assert p.shadow_suffix and w[0][0].startswith("metadata.annotations")


def test_shadow_head_rewrites_host_and_adds_internal():
    block = (b"POST /a HTTP/1.1\r\nhost: svc:8080\r\nx-envoy-internal: false\r\n"
             b"x-request-id: 7\r\ncontent-length: 2\r\n")
    assert head_authority(block) == b"svc:8080"
    out = shadow_head(block, shadow_authority(b"svc:8080"))
    assert out == (b"POST /a HTTP/1.1\r\nhost: svc-shadow:8080\r\nx-request-id: 7\r\n"
                   b"content-length: 2\r\nx-envoy-internal: true\r\n")
    full = shadow_head(block + b"\r\n", b"svc:8080")
    assert full.endswith(b"content-length: 2\r\nx-envoy-internal: true\r\n\r\n")
    assert full.count(b"\r\n\r\n") == 1


def test_shadow_head_host_elsewhere_or_missing():
    out = shadow_head(b"GET / HTTP/1.1\r\nx-a: 1\r\nHost: h\r\n\r\n", b"h-shadow")
    assert out == b"GET / HTTP/1.1\r\nx-a: 1\r\nhost: h-shadow\r\nx-envoy-internal: true\r\n\r\n"
    out = shadow_head(b"GET / HTTP/1.1\r\nx-a: 1\r\n\r\n", b"h-shadow")
    assert out == b"GET / HTTP/1.1\r\nhost: h-shadow\r\nx-a: 1\r\nx-envoy-internal: true\r\n\r\n"


# --- capture sink destination ----------------------------------------------------------------------

def test_capture_destination_settings_from_annotations():
    ann = {"meshcore.io/capture-file": "/var/log/cap.jsonl", "meshcore.io/capture-max-bytes": "10Mi",
           "meshcore.io/capture-body-limit": "4096", "meshcore.io/capture-keep": "3"}
    (p,), w = mirror_policies_from_istio(http(mirror={"host": CAPTURE_HOST}), ann)
    assert w == [] and p.is_capture
    assert p.capture == CaptureSettings(path="/var/log/cap.jsonl", max_bytes=10 * 1024 * 1024,
                                        body_limit=4096, keep=3)


def test_capture_defaults_and_bad_values_warn():
    (p,), w = mirror_policies_from_istio(http(mirror={"host": CAPTURE_HOST}),
                                         {"meshcore.io/capture-max-bytes": "lots"})
    assert p.capture == CaptureSettings()
    assert p.capture.path == DEFAULT_CAPTURE_FILE
    assert sorted(f for f, _ in w) == ["metadata.annotations[meshcore.io/capture-file]",
                                       "metadata.annotations[meshcore.io/capture-max-bytes]"]


def test_capture_in_mirrors_list_next_to_a_real_mirror():
    ann = {"meshcore.io/capture-file": "c.jsonl"}
    policies, w = mirror_policies_from_istio(http(mirrors=[
        {"destination": {"host": "sniffer"}},
        {"destination": {"host": CAPTURE_HOST}, "percentage": {"value": 10}}]), ann)
    assert w == [] and [p.is_capture for p in policies] == [False, True]
    assert policies[1].capture.path == "c.jsonl" and policies[1].numerator == 100_000


def test_parse_size():
    assert parse_size("64Ki") == 65536 and parse_size("1M") == 10**6 and parse_size(" 12 ") == 12
    with pytest.raises(ValueError):
        parse_size("1.5Mi")

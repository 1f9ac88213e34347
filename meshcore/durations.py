"""Go/Kubernetes duration strings (`15s`, `1.5s`, `100ms`, `1h30m`) and their seconds (T0).

Shared by config decoding and by the policy translators, so there is one grammar.
"""
import re

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go/Kubernetes duration string into seconds.

    `15s`, `1.5s`, `100ms`, `1m`, `1h`, `1h30m`, `0` are valid; a number without unit (`15`),
    negative values and anything else raise ValueError.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}")
    s = text
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("invalid duration ''")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(
                f"invalid duration {text!r} (expected a number with unit ns/us/ms/s/m/h, e.g. 15s, 1.5s, 100ms, 1m)"
            )
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


def to_seconds(value) -> float:
    """A duration given as a decoded `Duration` (anything with `.seconds`), a Go duration string,
    or a number of seconds. Raises ValueError or TypeError for anything else."""
    seconds = getattr(value, "seconds", None)
    if seconds is not None:
        return float(seconds)
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"not a duration: {value!r}")

"""HTTP/1.1 wire parsing: the compiled meshcore._ext.h1parse when built and allowed, else the pure twin."""
from meshcore import _accel
from meshcore.proto import h1_parse as _pure

_impl = _accel.load("h1parse") or _pure
__all__ = _pure.__all__
globals().update({_name: getattr(_impl, _name) for _name in __all__})
IMPL = "pure" if _impl is _pure else "compiled"

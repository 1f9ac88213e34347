"""HTTP/1.1 wire parsing: the compiled meshcore._ext.h1parse when built and allowed, else the pure
twin (imported only then: its tables cost a worker ~2 MB it would never use)."""
from meshcore import _accel

__all__ = [
    "MAX_REQUEST_HEAD", "MAX_HEADERS", "MAX_REQUEST_LINE", "MAX_RESPONSE_HEAD", "MAX_CHUNK_LINE",
    "BODY_NONE", "BODY_LENGTH", "BODY_CHUNKED", "BODY_CLOSE", "NEED_DATA",
    "DATA", "DONE", "RequestHead", "ResponseHead", "ChunkedReader", "parse_request",
    "parse_response", "request_body_kind", "response_body_kind", "R_FRAGMENT",
]

_impl = _accel.load("h1parse")
IMPL = "compiled"
if _impl is None:
    from meshcore.proto import h1_parse as _impl
    IMPL = "pure"
globals().update({_name: getattr(_impl, _name) for _name in __all__})

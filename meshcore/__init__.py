"""meshcore: an HTTP/1.1 sidecar proxy that reads Istio YAML and behaves as Istio's Envoy sidecar does."""

__version__ = "0.1.0"
__all__ = ["__version__"]

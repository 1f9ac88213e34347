"""Metrics: Istio's standard metrics in shared memory (istio), their label sets (labels), the
workers' thin recording calls (recorder), Envoy's stats as one list (envoy), and the Prometheus
text exposition (prometheus)."""

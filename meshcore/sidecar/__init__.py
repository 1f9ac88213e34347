"""Sidecar mode: transparent capture (iptables rules, the original destination of a redirected
connection), the per-connection outbound/inbound targets (meshcore.config.sidecar) and the
probe port. See README "Run as a sidecar"."""

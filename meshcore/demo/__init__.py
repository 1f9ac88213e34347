"""`python -m meshcore demo`: the seed article's scenarios on one machine.

Modules: `pod` (the article's test apps and the sniffer, one HTTP server per pod), `scenarios`
(which pods and YAML each scenario uses, the article's commands), `render` (the scenario's YAML
with this run's ports), `kubelet` (one process per pod, restarts, logs), `sidecar` (the proxy as a
child process, reached over HTTP only), `walkthrough` (the article's steps and checks) and
`runner` (the `demo` subcommand). `python -m meshcore.demo` runs pods (see `pod`).
"""


def run_demo(args) -> int:
    from meshcore.demo.runner import run_demo as run
    return run(args)

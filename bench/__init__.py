"""meshcore benchmark suite: `python -m meshcore bench` / `python -m bench` (see bench/README.md).

Not part of the product package; it runs from a source checkout.
"""

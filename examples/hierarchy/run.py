"""Three levels of vbatt controllers on loopback and a flat controller over the same nodes.

    .venv/bin/python examples/hierarchy/run.py --out var/hierarchy     # 3 rows x 3 racks x 20 nodes

Writes every controller's config, log, status and snapshot into --out and prints the class totals of
the tree against the flat controller (docs/hierarchy.md)."""

from vbatt.hierarchy.demo import main

if __name__ == "__main__":
    raise SystemExit(main())

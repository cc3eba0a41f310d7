"""Allocation across controllers (docs/hierarchy.md): the curves a child reports, the levels its parent
sends, and the leaf program that applies them."""

"""Simulated nodes: battery physics and demand profiles, in-process."""

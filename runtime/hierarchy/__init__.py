"""A controller in a tree of controllers (docs/hierarchy.md): the uplink that serves the virtual battery
upward as a node, the curves and levels between levels, the lease across levels."""

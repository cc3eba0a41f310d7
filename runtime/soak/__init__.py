"""`vbatt soak`: the fault-injection harness of the whole stack (not part of the runtime core)."""

"""The node side (`vbatt node`, `vbatt fleet`): the agent that serves a device's battery, its backends."""

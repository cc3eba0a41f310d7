"""Retentive state: the on-disk store and the retainer that saves and restores a run's memory."""

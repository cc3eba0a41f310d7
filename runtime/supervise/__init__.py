"""Process supervision of `vbatt run`: the supervisor, the child processes' entry points, services,
online change (reload) and the live view."""

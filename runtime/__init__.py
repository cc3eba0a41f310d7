__version__ = "0.1.0"

# before any numba `cache=True` function of the package is defined (docs/architecture.md, "Compiled code")
from vbatt.kernel.jitcache import configure as _configure_jit_cache

_configure_jit_cache()

# Type stub of the compiled CPU kernels (fastff/_cmm.pyx). The kernels take typed memoryviews
# and change as they are tuned, so only the stable module-level names are spelled out; the
# kernel functions are typed Any through __getattr__.
from typing import Any

ACTIVATIONS: dict[str, int]
HAVE_OPENMP: bool

MAX_THREADS: int

def __getattr__(name: str) -> Any: ...

"""Smoke check of an installed fastff wheel; run it from outside the source tree.

Imports the compiled kernels, requires OpenMP (a release wheel built without it would silently
run on one thread), and compares one hard inference of each layer kind with the dense NumPy
reference.
"""

import sys

import numpy as np

import fastff
from fastff import reference

if not fastff._cmm.HAVE_OPENMP:
    sys.exit("fastff was built without OpenMP")

x = np.random.default_rng(0).standard_normal((5, 8))
tree = fastff.UltraFFF(8, 4, depth=2, parallel_size=2, dtype=np.float64, seed=0)
expected, _ = reference.ultra_forward(x, tree.state_dict(), 2, 2, "gelu")
np.testing.assert_allclose(tree(x), expected, rtol=1e-10, atol=1e-12)

fff = fastff.FFF(8, 3, 4, depth=2, dtype=np.float64, seed=0)
np.testing.assert_allclose(
    fff(x), reference.fff_infer(x, fff.state_dict(), "relu"), rtol=1e-10, atol=1e-12
)

print(
    f"fastff {fastff.__version__} from {fastff.__file__}: OpenMP, "
    f"{fastff.get_num_threads()} threads, UltraFFF and FFF match the reference"
)

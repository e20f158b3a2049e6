"""Large-batch kernel paths for a valgrind run (see CONTRIBUTING.md), without the dense
reference that makes the equivalent tests take tens of minutes there: UltraFFF's
subtree-regrouped forward and backward, FFF's leaf-grouped inference and both leaf tiles."""

import numpy as np
from numpy.testing import assert_array_equal

import fastff
from fastff import _cmm

rng = np.random.default_rng(4)
tree = fastff.UltraFFF(300, 200, 9, 2, "gelu", seed=4)
x = rng.standard_normal((2000, 300)).astype(np.float32)
if _cmm._subtree_split(2000, 9, 300, 200, 4) >= 10:
    raise SystemExit("the batch no longer takes the subtree path; enlarge it")
y = tree(x)
assert_array_equal(y, np.concatenate([tree(x[i : i + 4]) for i in range(0, 2000, 4)]))
y_train, backprop = tree.forward_train(x)
assert_array_equal(y_train, y)
backprop(rng.standard_normal((2000, 200)).astype(np.float32))

fff = fastff.FFF(100, 70, 9, 7, "relu", seed=0)  # 128 leaves, 600 rows: grouped by leaf
xf = rng.standard_normal((600, 100)).astype(np.float32)
yf = fff(xf)
assert_array_equal(fff(xf[:5]), yf[:5])
for tile in ((2, 2), (4, 4), (4, 2)):
    previous = _cmm._set_leaf_tile(*tile)
    assert_array_equal(fff(xf), yf)
    _cmm._set_leaf_tile(*previous)
print("ok")

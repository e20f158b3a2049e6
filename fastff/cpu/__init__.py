"""CPU backend: CPUOps (ops.py) and the kernel sources fastff/_cmm.pyx includes (*.pxi, _simd.h)."""

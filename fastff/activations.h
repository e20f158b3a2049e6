/* Activation codes, defined once: the CPU kernels (fastff/_cmm.pyx, which exports them to Python
   as fastff._cmm.ACTIVATIONS) and the CUDA kernels (fastff/gpu/kernels.cu, compiled by
   fastff.gpu.kernels with this file inlined at its #include) both read this file. */
#ifndef FASTFF_ACTIVATIONS_H
#define FASTFF_ACTIVATIONS_H
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_GELU 2
#endif

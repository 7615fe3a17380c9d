// Portability macros: the math headers compile unchanged with g++ (CPU backend) and nvcc (CUDA).
#pragma once

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline __attribute__((always_inline))
#endif

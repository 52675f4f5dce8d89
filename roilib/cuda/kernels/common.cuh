// common.cuh: types and small helpers every kernel file uses.
//
// Each op is written once as a template over T, the element type in memory
// (float, double or __half), and A, the type arithmetic happens in: T itself, or
// float for __half (so float16 inputs accumulate in float32). The extern "C" entry
// points at the bottom of each .cu file instantiate the templates per dtype, with a
// _f16/_f32/_f64 suffix, so the host can look kernels up by plain names.
#ifndef ROILIB_COMMON_CUH
#define ROILIB_COMMON_CUH

#ifdef __CUDACC__  // NVCC and NVRTC
#include <cuda_fp16.h>
#else  // the system C++ compiler: one-thread CUDA built-ins
#include "cpu_shim.h"
#endif

// mode argument of the pooling kernels
#define ROILIB_AVG 0
#define ROILIB_MAX 1

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Float-to-int conversion that stays defined for any finite value: clamp to
// [lo, hi] in floating point first (a C cast of an out-of-range float is undefined).
template <class A>
__device__ __forceinline__ int clamp_to_int(A v, int lo, int hi) {
  return v <= (A)lo ? lo : (v >= (A)hi ? hi : (int)v);
}

// Max of plane[h0:h1, w0:w1] (RoIPool bins, SPP cells). Ties go to the first pixel in
// row-major order (strict >), so *arg = h * W + w is the same pixel the reference picks;
// an empty window gives 0 and *arg = -1.
template <class T, class A>
__device__ A window_max(const T* plane, int W, int h0, int h1, int w0, int w1, int* arg) {
  A best = 0;
  *arg = -1;
  for (int h = h0; h < h1; ++h) {
    for (int w = w0; w < w1; ++w) {
      A v = to_acc(plane[h * W + w]);
      if (*arg < 0 || v > best) {
        best = v;
        *arg = h * W + w;
      }
    }
  }
  return best;
}

#endif  // ROILIB_COMMON_CUH

// cpu_shim.h: just enough of CUDA for the kernels to compile as plain C++.
//
// The kernels are grid-stride loops, so a launch with one block of one thread runs every
// work item in order. This header makes that launch the only one there is: threadIdx and
// blockIdx are 0, blockDim and gridDim are 1. atomicAdd becomes a plain add (there is
// only one thread), and __half is a 16-bit struct with IEEE round-to-nearest-even
// conversions, the same rounding as cuda_fp16.h's __float2half.
//
// It is included only when the compiler is not NVCC/NVRTC (both define __CUDACC__).
#ifndef ROILIB_CPU_SHIM_H
#define ROILIB_CPU_SHIM_H

#include <cmath>
#include <cstring>

// The kernels call floor/ceil/round unqualified on float and double, as CUDA code does;
// these bring the float overloads into scope so float stays float.
using std::ceil;
using std::fabs;
using std::floor;
using std::round;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct roilib_dim3 {
  unsigned int x, y, z;
};
// One block of one thread by default. roilib_cpu_set_thread lets the host replay a
// real launch thread by thread (blocks x threads calls, each walking its own share of
// the grid-stride loop), which is how the tests reach a loop's second pass.
static roilib_dim3 threadIdx = {0, 0, 0};
static roilib_dim3 blockIdx = {0, 0, 0};
static roilib_dim3 blockDim = {1, 1, 1};
static roilib_dim3 gridDim = {1, 1, 1};

extern "C" void roilib_cpu_set_thread(unsigned int block, unsigned int thread, unsigned int blocks,
                                      unsigned int threads) {
  blockIdx.x = block;
  threadIdx.x = thread;
  gridDim.x = blocks;
  blockDim.x = threads;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, sizeof d);
  return d;
}

template <class T>
inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}

struct __half {
  unsigned short bits;
};

inline float __half2float(__half h) {
  unsigned int sign = (unsigned int)(h.bits & 0x8000u) << 16;
  unsigned int exponent = (h.bits >> 10) & 0x1fu;
  unsigned int mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    float v = std::ldexp((float)mantissa, -24);
    return sign ? -v : v;
  }
  unsigned int u = exponent == 0x1f ? sign | 0x7f800000u | (mantissa << 13)  // inf, nan
                                    : sign | ((exponent + 112u) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __half __float2half(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  unsigned int sign = (u >> 16) & 0x8000u;
  unsigned int magnitude = u & 0x7fffffffu;
  __half h;
  if (magnitude >= 0x7f800000u) {  // inf stays inf, nan stays a (quiet) nan
    h.bits = (unsigned short)(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    return h;
  }
  if (magnitude >= 0x477ff000u) {  // >= 65520 rounds past the largest half (65504)
    h.bits = (unsigned short)(sign | 0x7c00u);
    return h;
  }
  int exponent = (int)(magnitude >> 23) - 127;
  unsigned int bits, rest, halfway;
  if (exponent >= -14) {  // normal half: keep 10 of the 23 mantissa bits
    bits = ((unsigned int)(exponent + 15) << 10) | ((magnitude & 0x7fffffu) >> 13);
    rest = magnitude & 0x1fffu;
    halfway = 0x1000u;
  } else if (exponent >= -25) {  // subnormal half: count units of 2^-24
    unsigned int mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    int shift = -(exponent + 1);  // 14 .. 24
    bits = mantissa >> shift;
    rest = mantissa & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  } else {  // below half the smallest subnormal: rounds to zero
    bits = 0;
    rest = 0;
    halfway = 1;
  }
  // Round to nearest, ties to even; a carry into the exponent field is still correct.
  if (rest > halfway || (rest == halfway && (bits & 1u))) bits += 1;
  h.bits = (unsigned short)(sign | bits);
  return h;
}

#endif  // ROILIB_CPU_SHIM_H

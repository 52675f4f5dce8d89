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

// Every kernel is a grid-stride loop over its n work items. Indices are long long: a
// (K, C, PH, PW) output passes 2^31 elements at K = 4096, C = 512, 32 x 32, and `long`
// is only 32 bits on Windows.
#define ROILIB_FOR_EACH(i, n) \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)

// Largest side of the square tiles of the deterministic backward (each work item keeps
// a ROILIB_TILE^2 accumulator; the host picks the side, at most this, as
// KernelOps.max_tile).
#ifndef ROILIB_TILE
#define ROILIB_TILE 16
#endif

// Channels one work item of the sampled ops' tiled backward handles together (they
// share the box geometry; the host picks the count, at most this).
#ifndef ROILIB_TILE_CHANNELS
#ifdef __CUDACC__
#define ROILIB_TILE_CHANNELS 1
#else
#define ROILIB_TILE_CHANNELS 8
#endif
#endif

// Taps (sample positions along x) a tile's backward keeps per box; more are recomputed.
#ifndef ROILIB_TAP_CACHE
#ifdef __CUDACC__
#define ROILIB_TAP_CACHE 32
#else
#define ROILIB_TAP_CACHE 64
#endif
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

// A quiet NaN: what an op writes for a box it cannot read (see roi_is_valid).
__device__ __forceinline__ float nan_of(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_of(double) { return __longlong_as_double(0x7ff8000000000000LL); }

// Machine epsilon of the arithmetic type (bounds on rounding error in index solves).
__device__ __forceinline__ float eps_of(float) { return 1.1920928955078125e-7f; }
__device__ __forceinline__ double eps_of(double) { return 2.220446049250313e-16; }

// Boxes on a device are not value-checked on the host (that would copy them back and
// synchronise the GPU), so every kernel checks the row it reads: an integral batch
// index in [0, N) and finite coordinates. v - v is 0 exactly when v is finite (no
// --use_fast_math, so inf and NaN propagate). A bad row outputs NaN and routes no
// gradient, so it can never read outside the map nor pass unnoticed.
template <class A>
__device__ __forceinline__ bool roi_row_is_valid(const A* roi, long long N, int columns) {
  A b = roi[0];
  if (!(b >= (A)0 && b < (A)N && b == floor(b))) return false;
  for (int j = 1; j < columns; ++j)
    if (!(roi[j] - roi[j] == (A)0)) return false;
  return true;
}

template <class A>
__device__ __forceinline__ bool roi_is_valid(const A* roi, int N) {
  return roi_row_is_valid(roi, N, 5);
}

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
__device__ A window_max(const T* __restrict__ plane, int W, int h0, int h1, int w0, int w1, int* arg) {
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

// Output element i = ((k * C + c) * PH + ph) * PW + pw.
struct OutIndex {
  long long k;
  int c, ph, pw;
};

__device__ __forceinline__ OutIndex out_index(long long i, int C, int PH, int PW) {
  OutIndex o;
  o.pw = (int)(i % PW);
  o.ph = (int)(i / PW % PH);
  o.c = (int)(i / PW / PH % C);
  o.k = i / PW / PH / C;
  return o;
}


// One work item of a tiled deterministic backward: image b, channels c .. c + nc - 1
// (a group of cg; cg = 1 gives one channel per item), and the tile of rows r0..r1 and
// columns c0..c1 (clipped to the map) whose boxes are lists[list0 .. list0 + count),
// in box order (tiles.cu). Items run over (b, channel group, tile row, tile column).
struct TileItem {
  long long b, list0;
  int c, nc, r0, r1, c0, c1, count;
};

__device__ __forceinline__ TileItem tile_item(long long i, int C, int cg, int H, int W, int ts, int TY, int TX,
                                              int K, const int* __restrict__ cumsum) {
  TileItem t;
  int groups = (C + cg - 1) / cg;
  int tx = (int)(i % TX), ty = (int)(i / TX % TY);
  t.c = (int)(i / TX / TY % groups) * cg;
  t.nc = imin(cg, C - t.c);
  t.b = i / TX / TY / groups;
  long long tile = (t.b * TY + ty) * TX + tx;
  t.r0 = ty * ts;
  t.c0 = tx * ts;
  t.r1 = imin(t.r0 + ts, H) - 1;
  t.c1 = imin(t.c0 + ts, W) - 1;
  t.list0 = tile * K;
  t.count = cumsum[tile * K + K - 1];
  return t;
}

// Writes a tile's accumulators (one ts x ts block per channel of the item) to its
// pixels of planes (b, c ..) of grad_input.
template <class A>
__device__ __forceinline__ void store_tile(const TileItem& t, const A* acc, int ts, int C, int H, int W,
                                           A* __restrict__ grad_input) {
  for (int q = 0; q < t.nc; ++q) {
    A* out = grad_input + (t.b * C + t.c + q) * H * W;
    const A* a = acc + q * ts * ts;
    for (int y = t.r0; y <= t.r1; ++y)
      for (int x = t.c0; x <= t.c1; ++x) out[(long long)y * W + x] = a[(y - t.r0) * ts + (x - t.c0)];
  }
}

#endif  // ROILIB_COMMON_CUH

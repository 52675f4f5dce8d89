// spp.cu: spatial pyramid pooling (SPP-net) forward and backward.
//
// The host launches each kernel once per pyramid level L; level L splits an axis of
// length a into bins [floor(i*a/L), ceil((i+1)*a/L)) (exact integer arithmetic) and
// writes its N x (C*L*L) cells at column `offset` of the (N, stride) output, channel
// major. Launches on one stream run in order, so the deterministic backward can
// accumulate level after level into the same buffer without atomics.
#include "common.cuh"

__device__ __forceinline__ void spp_bin(int i, int L, int size, int* lo, int* hi) {
  *lo = i * size / L;
  *hi = ((i + 1) * size + L - 1) / L;
}

// Forward: one work item per cell (b, c, i, j) of this level.
template <class T, class A>
__device__ void spp_forward(long long n, const T* __restrict__ input, int C, int H, int W, int L, int offset, int stride, int mode,
                            T* __restrict__ output) {
  ROILIB_FOR_EACH(t, n) {
    int j = (int)(t % L), i = (int)(t / L % L), c = (int)(t / L / L % C);
    long long b = t / L / L / C;
    int h0, h1, w0, w1;
    spp_bin(i, L, H, &h0, &h1);
    spp_bin(j, L, W, &w0, &w1);
    const T* plane = input + (b * C + c) * H * W;
    A v = 0;
    if (mode == ROILIB_MAX) {
      int arg;
      v = window_max<T, A>(plane, W, h0, h1, w0, w1, &arg);
    } else {
      for (int h = h0; h < h1; ++h)
        for (int w = w0; w < w1; ++w) v += to_acc(plane[h * W + w]);
      v = v / (A)((h1 - h0) * (w1 - w0));
    }
    store(output + b * stride + offset + (c * L + i) * L + j, v);
  }
}

// Backward with atomics (bins of one level can overlap): one work item per cell.
// grad_input is in A and must be zeroed before the first level.
template <class T, class A>
__device__ void spp_backward_atomic(long long n, const T* __restrict__ grad_output, const T* __restrict__ input, int C, int H, int W, int L,
                                    int offset, int stride, int mode, A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(t, n) {
    int j = (int)(t % L), i = (int)(t / L % L), c = (int)(t / L / L % C);
    long long b = t / L / L / C;
    int h0, h1, w0, w1;
    spp_bin(i, L, H, &h0, &h1);
    spp_bin(j, L, W, &w0, &w1);
    long long plane = (b * C + c) * H * W;
    A g = to_acc(grad_output[b * stride + offset + (c * L + i) * L + j]);
    if (mode == ROILIB_MAX) {
      int arg;
      window_max<T, A>(input + plane, W, h0, h1, w0, w1, &arg);
      atomicAdd(grad_input + plane + arg, g);
    } else {
      g = g / (A)((h1 - h0) * (w1 - w0));
      for (int h = h0; h < h1; ++h)
        for (int w = w0; w < w1; ++w) atomicAdd(grad_input + plane + h * W + w, g);
    }
  }
}

// Deterministic backward for one level: one work item per plane (b, c) adds, cell by
// cell, each cell's gradient (max: at its argmax; avg: spread over its window) to its
// plane of grad_input, which it zeroes first when `first` is set. A plane belongs to
// one work item, so no atomics are needed; levels are launched in order on one
// stream, so the additions come in a fixed order: the order in which the atomic
// version adds them on the CPU, so the two agree bit for bit there.
template <class T, class A>
__device__ void spp_backward_planes(long long n, const T* __restrict__ grad_output, const T* __restrict__ input,
                                    int C, int H, int W, int L, int offset, int stride, int mode, int first,
                                    A* __restrict__ grad_input) {
  ROILIB_FOR_EACH(t, n) {
    int c = (int)(t % C);
    long long b = t / C;
    A* plane = grad_input + t * H * W;
    const T* x = input + t * H * W;
    if (first)
      for (long long p = 0; p < (long long)H * W; ++p) plane[p] = 0;
    {
      for (int i = 0; i < L; ++i) {
        int h0, h1;
        spp_bin(i, L, H, &h0, &h1);
        for (int j = 0; j < L; ++j) {
          int w0, w1;
          spp_bin(j, L, W, &w0, &w1);
          A g = to_acc(grad_output[b * stride + offset + (c * L + i) * L + j]);
          if (mode == ROILIB_MAX) {
            int arg;
            window_max<T, A>(x, W, h0, h1, w0, w1, &arg);
            plane[arg] += g;
          } else {
            g = g / (A)((h1 - h0) * (w1 - w0));
            for (int h = h0; h < h1; ++h)
              for (int w = w0; w < w1; ++w) plane[h * W + w] += g;
          }
        }
      }
    }
  }
}

#define SPP_ENTRY_POINTS(SUFFIX, T, A)                                                                               \
  extern "C" __global__ void spp_forward_##SUFFIX(long long n, const T* __restrict__ input, int C, int H, int W, int L, int offset,    \
                                                  int stride, int mode, T* __restrict__ output) {                                 \
    spp_forward<T, A>(n, input, C, H, W, L, offset, stride, mode, output);                                           \
  }                                                                                                                  \
  extern "C" __global__ void spp_backward_atomic_##SUFFIX(long long n, const T* __restrict__ grad_output, const T* __restrict__ input, int C,      \
                                                          int H, int W, int L, int offset, int stride, int mode,     \
                                                          A* __restrict__ grad_input) {                                           \
    spp_backward_atomic<T, A>(n, grad_output, input, C, H, W, L, offset, stride, mode, grad_input);                  \
  }                                                                                                                  \
  extern "C" __global__ void spp_backward_planes_##SUFFIX(                                                            \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, int C, int H, int W, int L,        \
      int offset, int stride, int mode, int first, A* __restrict__ grad_input) {                                      \
    spp_backward_planes<T, A>(n, grad_output, input, C, H, W, L, offset, stride, mode, first, grad_input);            \
  }

SPP_ENTRY_POINTS(f16, __half, float)
SPP_ENTRY_POINTS(f32, float, float)
SPP_ENTRY_POINTS(f64, double, double)

// roi_pool.cu: RoIPool (Fast R-CNN) forward and backward.
//
// The scaled box corners are C-rounded (half away from zero); the box is
// end - start + 1 pixels (at least 1); bin p spans [floor(p*bin), ceil((p+1)*bin))
// pixels from start, clipped to the map. The output is the bin's max (0 when empty)
// and the backward routes each output's gradient to that max's pixel.
#include "common.cuh"

// The rounded box of one RoI and its bin size. Kept in floating point (not int like
// torchvision) so absurd coordinates cannot overflow an int; for any box within
// 2^24 pixels the values are the same integers.
template <class A>
struct PoolBox {
  int batch;
  A y0, x0;
  A bin_h, bin_w;
};

template <class A>
__device__ PoolBox<A> pool_box(const A* roi, A scale, int PH, int PW) {
  PoolBox<A> b;
  b.batch = (int)roi[0];
  b.x0 = round(roi[1] * scale);
  b.y0 = round(roi[2] * scale);
  A roi_w = round(roi[3] * scale) - b.x0 + (A)1;
  A roi_h = round(roi[4] * scale) - b.y0 + (A)1;
  b.bin_w = (roi_w < (A)1 ? (A)1 : roi_w) / (A)PW;
  b.bin_h = (roi_h < (A)1 ? (A)1 : roi_h) / (A)PH;
  return b;
}

// Pixel range [*lo, *hi) of bin p on one axis, clipped to [0, size].
template <class A>
__device__ __forceinline__ void pool_bin_range(A start, A bin, int p, int size, int* lo, int* hi) {
  *lo = clamp_to_int(floor((A)p * bin) + start, 0, size);
  *hi = clamp_to_int(ceil((A)(p + 1) * bin) + start, 0, size);
}

// Max of bin (ph, pw) of box b; *arg = h * W + w of its pixel, -1 when empty.
template <class T, class A>
__device__ __forceinline__ A pool_bin_max(const T* plane, int H, int W, const PoolBox<A>& b, int ph, int pw,
                                          int* arg) {
  int h0, h1, w0, w1;
  pool_bin_range(b.y0, b.bin_h, ph, H, &h0, &h1);
  pool_bin_range(b.x0, b.bin_w, pw, W, &w0, &w1);
  return window_max<T, A>(plane, W, h0, h1, w0, w1, arg);
}

// Forward: one work item per output element (k, c, ph, pw).
template <class T, class A>
__device__ void roi_pool_forward(long n, const T* input, const A* rois, int C, int H, int W, int PH, int PW, A scale,
                                 T* output) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    PoolBox<A> b = pool_box(rois + 5 * k, scale, PH, PW);
    int arg;
    store(output + i, pool_bin_max(input + ((long)b.batch * C + c) * H * W, H, W, b, ph, pw, &arg));
  }
}

// First pass of the deterministic backward: each output's argmax (h * W + w, or -1).
template <class T, class A>
__device__ void roi_pool_argmax(long n, const T* input, const A* rois, int C, int H, int W, int PH, int PW, A scale,
                                int* argmax) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    PoolBox<A> b = pool_box(rois + 5 * k, scale, PH, PW);
    pool_bin_max(input + ((long)b.batch * C + c) * H * W, H, W, b, ph, pw, argmax + i);
  }
}

// Backward with atomics: each output adds its gradient at its argmax pixel.
// grad_input is in A and must be zeroed.
template <class T, class A>
__device__ void roi_pool_backward_atomic(long n, const T* grad_output, const T* input, const A* rois, int C, int H,
                                         int W, int PH, int PW, A scale, A* grad_input) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH), c = (int)(i / PW / PH % C);
    long k = i / PW / PH / C;
    PoolBox<A> b = pool_box(rois + 5 * k, scale, PH, PW);
    long plane_offset = ((long)b.batch * C + c) * H * W;
    int arg;
    pool_bin_max(input + plane_offset, H, W, b, ph, pw, &arg);
    if (arg >= 0) atomicAdd(grad_input + plane_offset + arg, to_acc(grad_output[i]));
  }
}

// Deterministic backward, step 1: one work item per box writes
// ranges[5k .. 5k+4] = {image, first row, last row, first column, last column} that
// its non-empty bins cover (image -1: none).
template <class A>
__device__ void roi_pool_ranges(long n, const A* rois, int H, int W, int PH, int PW, A scale, int* ranges) {
  for (long k = blockIdx.x * (long)blockDim.x + threadIdx.x; k < n; k += (long)blockDim.x * gridDim.x) {
    PoolBox<A> b = pool_box(rois + 5 * k, scale, PH, PW);
    int* r = ranges + 5 * k;
    r[1] = H, r[2] = -1, r[3] = W, r[4] = -1;
    for (int p = 0; p < PH; ++p) {
      int lo, hi;
      pool_bin_range(b.y0, b.bin_h, p, H, &lo, &hi);
      if (lo < hi) r[1] = imin(r[1], lo), r[2] = imax(r[2], hi - 1);
    }
    for (int p = 0; p < PW; ++p) {
      int lo, hi;
      pool_bin_range(b.x0, b.bin_w, p, W, &lo, &hi);
      if (lo < hi) r[3] = imin(r[3], lo), r[4] = imax(r[4], hi - 1);
    }
    r[0] = (r[1] <= r[2] && r[3] <= r[4]) ? b.batch : -1;
  }
}

// Deterministic backward, step 2: one work item per input element (b, c, h, w) sums,
// box by box and bin by bin, the gradients of the bins whose argmax is this pixel.
// grad_input is in A and is overwritten.
template <class T, class A>
__device__ void roi_pool_backward_gather(long n, const T* grad_output, const A* rois, const int* ranges,
                                         const int* argmax, int K, int C, int H, int W, int PH, int PW, A scale,
                                         A* grad_input) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)blockDim.x * gridDim.x) {
    int w = (int)(i % W), h = (int)(i / W % H), c = (int)(i / W / H % C);
    int img = (int)(i / W / H / C);
    A acc = 0;
    for (int k = 0; k < K; ++k) {
      const int* r = ranges + 5 * k;
      if (r[0] != img || h < r[1] || h > r[2] || w < r[3] || w > r[4]) continue;
      PoolBox<A> b = pool_box(rois + 5 * (long)k, scale, PH, PW);
      long out0 = ((long)k * C + c) * PH * PW;
      for (int ph = 0; ph < PH; ++ph) {
        int h0, h1;
        pool_bin_range(b.y0, b.bin_h, ph, H, &h0, &h1);
        if (h < h0 || h >= h1) continue;
        for (int pw = 0; pw < PW; ++pw) {
          if (argmax[out0 + ph * PW + pw] == h * W + w) acc += to_acc(grad_output[out0 + ph * PW + pw]);
        }
      }
    }
    grad_input[i] = acc;
  }
}

#define ROI_POOL_ENTRY_POINTS(SUFFIX, T, A)                                                                          \
  extern "C" __global__ void roi_pool_forward_##SUFFIX(long n, const T* input, const A* rois, int C, int H, int W,   \
                                                       int PH, int PW, A scale, T* output) {                         \
    roi_pool_forward<T, A>(n, input, rois, C, H, W, PH, PW, scale, output);                                          \
  }                                                                                                                  \
  extern "C" __global__ void roi_pool_argmax_##SUFFIX(long n, const T* input, const A* rois, int C, int H, int W,    \
                                                      int PH, int PW, A scale, int* argmax) {                        \
    roi_pool_argmax<T, A>(n, input, rois, C, H, W, PH, PW, scale, argmax);                                           \
  }                                                                                                                  \
  extern "C" __global__ void roi_pool_backward_atomic_##SUFFIX(long n, const T* grad_output, const T* input,         \
                                                               const A* rois, int C, int H, int W, int PH, int PW,   \
                                                               A scale, A* grad_input) {                             \
    roi_pool_backward_atomic<T, A>(n, grad_output, input, rois, C, H, W, PH, PW, scale, grad_input);                 \
  }                                                                                                                  \
  extern "C" __global__ void roi_pool_ranges_##SUFFIX(long n, const A* rois, int H, int W, int PH, int PW, A scale,  \
                                                      int* ranges) {                                                 \
    roi_pool_ranges<A>(n, rois, H, W, PH, PW, scale, ranges);                                                        \
  }                                                                                                                  \
  extern "C" __global__ void roi_pool_backward_gather_##SUFFIX(long n, const T* grad_output, const A* rois,          \
                                                               const int* ranges, const int* argmax, int K, int C,   \
                                                               int H, int W, int PH, int PW, A scale,                \
                                                               A* grad_input) {                                      \
    roi_pool_backward_gather<T, A>(n, grad_output, rois, ranges, argmax, K, C, H, W, PH, PW, scale, grad_input);     \
  }

ROI_POOL_ENTRY_POINTS(f16, __half, float)
ROI_POOL_ENTRY_POINTS(f32, float, float)
ROI_POOL_ENTRY_POINTS(f64, double, double)

// ps_roi.cu: position-sensitive RoIPool and RoIAlign (R-FCN), forward and atomic backward.
//
// Semantics: torchvision's ps_roi_pool / ps_roi_align forward (see roilib/family.py and
// roilib/reference/ps_roi.py). The input has C = C_out * PH * PW channels; output
// (k, c, ph, pw) reads input channel (c * PH + ph) * PW + pw only.
//
// PS-RoIPool: C-rounded corners, box end - start pixels (at least 1), bins clipped to
// [0, size - 1], mean of the bin (0 when empty). Its backward is the forward's exact
// transpose (torchvision's backward clips to [0, size] instead).
// PS-RoIAlign: RoIAlign with the half-pixel offset and no size clamp, bilinear samples
// averaged over max(gh * gw, 1) (torchvision divides by gh * gw, NaN when it is 0).
//
// Every work item writes its output, so outputs need no zero-fill; the atomic backward
// accumulates into a zeroed buffer in the arithmetic type A.
#include "sampling.cuh"

// Input channel of output channel c, bin (ph, pw).
__device__ __forceinline__ long long ps_channel(long long c, int ph, int pw, int PH, int PW) {
  return (c * PH + ph) * PW + pw;
}

// One axis of a PS-RoIPool bin: [*start, *end) in pixels, clipped to [0, size - 1].
template <class A>
__device__ void ps_pool_axis(A lo, A hi, A scale, int p, int P, int size, int* start, int* end) {
  const int big = 1 << 29;  // keeps the int conversions and the difference defined
  int s = clamp_to_int(round(lo * scale), -big, big);
  int e = clamp_to_int(round(hi * scale), -big, big);
  int len = imax(e - s, 1);
  A bin = (A)len / (A)P;
  int b0 = (int)floor((A)p * bin);
  int b1 = (int)ceil((A)(p + 1) * bin);
  *start = imin(imax(b0 + s, 0), size - 1);
  *end = imin(imax(b1 + s, 0), size - 1);
}

template <class T, class A>
__device__ void ps_roi_pool_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                                    int H, int W, int PH, int PW, int C_out, A scale, T* __restrict__ output) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C_out, k = i / PW / PH / C_out;
    const A* roi = rois + 5 * k;
    if (!roi_is_valid(roi, N)) {  // device boxes are checked here, not on the host
      store(output + i, nan_of(A()));
      continue;
    }
    int hs, he, ws, we;
    ps_pool_axis(roi[2], roi[4], scale, ph, PH, H, &hs, &he);
    ps_pool_axis(roi[1], roi[3], scale, pw, PW, W, &ws, &we);
    const T* plane = input + ((long long)roi[0] * C + ps_channel(c, ph, pw, PH, PW)) * H * W;
    A sum = 0;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w) sum += to_acc(plane[(long long)h * W + w]);
    bool empty = he <= hs || we <= ws;
    store(output + i, empty ? (A)0 : sum / (A)((he - hs) * (we - ws)));
  }
}

template <class T, class A>
__device__ void ps_roi_pool_backward_atomic(long long n, const T* __restrict__ grad_output,
                                            const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,
                                            int C_out, A scale, A* __restrict__ grad_input) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C_out, k = i / PW / PH / C_out;
    const A* roi = rois + 5 * k;
    if (!roi_is_valid(roi, N)) continue;
    int hs, he, ws, we;
    ps_pool_axis(roi[2], roi[4], scale, ph, PH, H, &hs, &he);
    ps_pool_axis(roi[1], roi[3], scale, pw, PW, W, &ws, &we);
    if (he <= hs || we <= ws) continue;
    A share = to_acc(grad_output[i]) / (A)((he - hs) * (we - ws));
    A* plane = grad_input + ((long long)roi[0] * C + ps_channel(c, ph, pw, PH, PW)) * H * W;
    for (int h = hs; h < he; ++h)
      for (int w = ws; w < we; ++w) atomicAdd(plane + (long long)h * W + w, share);
  }
}

// PS-RoIAlign's box: RoIAlign's with the half-pixel offset and no clamp of the size.
template <class A>
__device__ __forceinline__ SampleGrid<A> ps_align_grid(const A* roi, A scale, int N, int PH, int PW,
                                                      int sampling_ratio) {
  const A off = (A)0.5;
  return sample_grid<A>(roi_is_valid(roi, N), (int)roi[0], roi[1] * scale - off, roi[2] * scale - off, roi[3] * scale - off,
                        roi[4] * scale - off, PH, PW, sampling_ratio, false);
}

template <class T, class A>
__device__ void ps_roi_align_forward(long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C,
                                     int H, int W, int PH, int PW, int C_out, A scale, int sampling_ratio,
                                     T* __restrict__ output) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C_out, k = i / PW / PH / C_out;
    SampleGrid<A> g = ps_align_grid(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    if (!g.valid) {
      store(output + i, nan_of(A()));
      continue;
    }
    const T* plane = input + ((long long)g.batch * C + ps_channel(c, ph, pw, PH, PW)) * H * W;
    store(output + i, bin_average(plane, H, W, g, ph, pw));
  }
}

template <class T, class A>
__device__ void ps_roi_align_backward_atomic(long long n, const T* __restrict__ grad_output,
                                             const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,
                                             int C_out, A scale, int sampling_ratio, A* __restrict__ grad_input) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C_out, k = i / PW / PH / C_out;
    SampleGrid<A> g = ps_align_grid(rois + 5 * k, scale, N, PH, PW, sampling_ratio);
    A* plane = grad_input + ((long long)g.batch * C + ps_channel(c, ph, pw, PH, PW)) * H * W;
    A go = to_acc(grad_output[i]);
    for (int iy = 0; iy < g.gh; ++iy) {
      Tap<A> ty = tap_y(g, ph, iy, H);
      for (int ix = 0; ix < g.gw; ++ix) scatter_sample(plane, W, ty, tap_x(g, pw, ix, W), go, g.count);
    }
  }
}

// extern "C" entry points, one set per dtype: T in memory, A for arithmetic and boxes.
#define PS_ROI_ENTRY_POINTS(SUFFIX, T, A)                                                                           \
  extern "C" __global__ void ps_roi_pool_forward_##SUFFIX(long long n, const T* __restrict__ input,                 \
                                                          const A* __restrict__ rois, int N, int C, int H, int W, int PH,  \
                                                          int PW, int C_out, A scale, T* __restrict__ output) {     \
    ps_roi_pool_forward<T, A>(n, input, rois, N, C, H, W, PH, PW, C_out, scale, output);                               \
  }                                                                                                                 \
  extern "C" __global__ void ps_roi_pool_backward_atomic_##SUFFIX(                                                  \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, int N, int C, int H, int W, int PH,      \
      int PW, int C_out, A scale, A* __restrict__ grad_input) {                                                     \
    ps_roi_pool_backward_atomic<T, A>(n, grad_output, rois, N, C, H, W, PH, PW, C_out, scale, grad_input);             \
  }                                                                                                                 \
  extern "C" __global__ void ps_roi_align_forward_##SUFFIX(                                                         \
      long long n, const T* __restrict__ input, const A* __restrict__ rois, int N, int C, int H, int W, int PH, int PW,    \
      int C_out, A scale, int sampling_ratio, T* __restrict__ output) {                                             \
    ps_roi_align_forward<T, A>(n, input, rois, N, C, H, W, PH, PW, C_out, scale, sampling_ratio, output);              \
  }                                                                                                                 \
  extern "C" __global__ void ps_roi_align_backward_atomic_##SUFFIX(                                                 \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, int N, int C, int H, int W, int PH,      \
      int PW, int C_out, A scale, int sampling_ratio, A* __restrict__ grad_input) {                                 \
    ps_roi_align_backward_atomic<T, A>(n, grad_output, rois, N, C, H, W, PH, PW, C_out, scale, sampling_ratio,         \
                                       grad_input);                                                                 \
  }

PS_ROI_ENTRY_POINTS(f16, __half, float)
PS_ROI_ENTRY_POINTS(f32, float, float)
PS_ROI_ENTRY_POINTS(f64, double, double)

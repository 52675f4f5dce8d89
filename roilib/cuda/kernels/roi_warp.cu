// roi_warp.cu: RoIWarp (MNC) forward and backward.
//
// RoIWarp = RoIPool's rounded box + RoIAlign's bilinear sampling (aligned=False
// geometry, spatial scale 1 on the rounded box). Only the box differs from RoIAlign,
// so this file is WarpBox plus entry points; the kernels are in sampling.cuh.
#include "sampling.cuh"

// RoIWarp's box: scaled corners C-rounded to whole feature pixels (half away from zero).
template <class A>
struct WarpBox {
  A scale;
  int images;

  __device__ SampleGrid<A> grid(const A* roi, int PH, int PW, int sampling_ratio) const {
    bool valid = roi_is_valid(roi, images);
    return sample_grid<A>(valid, (int)roi[0], round(roi[1] * scale), round(roi[2] * scale), round(roi[3] * scale),
                          round(roi[4] * scale), PH, PW, sampling_ratio, true);
  }
};

#define ROILIB_WARP_BOX(A) WarpBox<A>{scale, N}
#define ROI_WARP_ENTRY_POINTS(SUFFIX, T, A)                                                                           \
  extern "C" __global__ void roi_warp_forward_##SUFFIX(long long n, const T* __restrict__ input,                      \
                                                       const A* __restrict__ rois, int N, int C, int H, int W,        \
                                                       int PH, int PW, A scale, int sampling_ratio, int mode,         \
                                                       T* __restrict__ output) {                                      \
    sampled_forward<T, A>(n, input, rois, C, H, W, PH, PW, ROILIB_WARP_BOX(A), sampling_ratio, mode, output);            \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_argmax_##SUFFIX(long long n, const T* __restrict__ input,                       \
                                                      const A* __restrict__ rois, int N, int C, int H, int W, int PH, \
                                                      int PW, A scale, int sampling_ratio, int* __restrict__ winner) {\
    sampled_argmax<T, A>(n, input, rois, C, H, W, PH, PW, ROILIB_WARP_BOX(A), sampling_ratio, winner);                   \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_backward_atomic_##SUFFIX(                                                       \
      long long n, const T* __restrict__ grad_output, const T* __restrict__ input, const A* __restrict__ rois, int N, \
      int C, int H, int W, int PH, int PW, A scale, int sampling_ratio, int mode, A* __restrict__ grad_input) {       \
    sampled_backward_atomic<T, A>(n, grad_output, input, rois, C, H, W, PH, PW, ROILIB_WARP_BOX(A), sampling_ratio,      \
                                  mode, grad_input);                                                                  \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_ranges_##SUFFIX(long long n, const A* __restrict__ rois, int N, int H, int W,   \
                                                      int PH, int PW, A scale, int sampling_ratio,                    \
                                                      int* __restrict__ ranges) {                                     \
    sampled_ranges<A>(n, rois, H, W, PH, PW, ROILIB_WARP_BOX(A), sampling_ratio, ranges);                                \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_backward_tiles_##SUFFIX(                                                        \
      long long n, const T* __restrict__ grad_output, const A* __restrict__ rois, const int* __restrict__ lists,      \
      const int* __restrict__ cumsum, const int* __restrict__ winner, int K, int N, int C, int H, int W, int PH,      \
      int PW, A scale, int sampling_ratio, int mode, int ts, int TY, int TX, A* __restrict__ grad_input) {            \
    sampled_backward_tiles<T, A>(n, grad_output, rois, lists, cumsum, winner, K, C, H, W, PH, PW, ROILIB_WARP_BOX(A),    \
                                 sampling_ratio, mode, ts, TY, TX, grad_input);                                       \
  }

ROI_WARP_ENTRY_POINTS(f16, __half, float)
ROI_WARP_ENTRY_POINTS(f32, float, float)
ROI_WARP_ENTRY_POINTS(f64, double, double)

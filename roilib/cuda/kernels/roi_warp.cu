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

  __device__ SampleGrid<A> grid(const A* roi, int PH, int PW, int sampling_ratio) const {
    return sample_grid<A>((int)roi[0], round(roi[1] * scale), round(roi[2] * scale), round(roi[3] * scale),
                          round(roi[4] * scale), PH, PW, sampling_ratio, true);
  }
};

#define ROI_WARP_ENTRY_POINTS(SUFFIX, T, A)                                                                           \
  extern "C" __global__ void roi_warp_forward_##SUFFIX(long n, const T* input, const A* rois, int C, int H, int W,    \
                                                       int PH, int PW, A scale, int sampling_ratio, int mode,         \
                                                       T* output) {                                                   \
    sampled_forward<T, A>(n, input, rois, C, H, W, PH, PW, WarpBox<A>{scale}, sampling_ratio, mode, output);          \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_argmax_##SUFFIX(long n, const T* input, const A* rois, int C, int H, int W,     \
                                                      int PH, int PW, A scale, int sampling_ratio, int* winner) {     \
    sampled_argmax<T, A>(n, input, rois, C, H, W, PH, PW, WarpBox<A>{scale}, sampling_ratio, winner);                 \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_backward_atomic_##SUFFIX(long n, const T* grad_output, const T* input,          \
                                                               const A* rois, int C, int H, int W, int PH, int PW,    \
                                                               A scale, int sampling_ratio, int mode,                 \
                                                               A* grad_input) {                                       \
    sampled_backward_atomic<T, A>(n, grad_output, input, rois, C, H, W, PH, PW, WarpBox<A>{scale}, sampling_ratio,    \
                                  mode, grad_input);                                                                  \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_ranges_##SUFFIX(long n, const A* rois, int H, int W, int PH, int PW, A scale,   \
                                                      int sampling_ratio, int* ranges) {                              \
    sampled_ranges<A>(n, rois, H, W, PH, PW, WarpBox<A>{scale}, sampling_ratio, ranges);                              \
  }                                                                                                                   \
  extern "C" __global__ void roi_warp_backward_gather_##SUFFIX(                                                       \
      long n, const T* grad_output, const A* rois, const int* ranges, const int* winner, int K, int C, int H, int W,  \
      int PH, int PW, A scale, int sampling_ratio, int mode, A* grad_input) {                                         \
    sampled_backward_gather<T, A>(n, grad_output, rois, ranges, winner, K, C, H, W, PH, PW, WarpBox<A>{scale},        \
                                  sampling_ratio, mode, grad_input);                                                  \
  }

ROI_WARP_ENTRY_POINTS(f16, __half, float)
ROI_WARP_ENTRY_POINTS(f32, float, float)
ROI_WARP_ENTRY_POINTS(f64, double, double)

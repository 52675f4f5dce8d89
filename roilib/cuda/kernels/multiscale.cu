// multiscale.cu: RoIAlign over a feature pyramid (FPN), all levels in one launch.
//
// torchvision's MultiScaleRoIAlign loops over the levels in Python: one gather of the
// level's boxes, one roi_align launch and one scatter of the results per level. Here a
// first kernel writes each box's level (FPN's Eq. 1, roilib/family.py), and one forward
// launch covers every output element of every box: it reads the box's level and takes
// that level's map, size and scale from small per-level tables. Nothing goes back to
// the host in between.
//
// The per-level table `maps` holds, for level l, {address of its (N, C, H_l, W_l)
// array, H_l, W_l} as three int64; `scales` holds its spatial scale in the arithmetic
// type A. The backward's `grads` table has the same layout for the gradients (in A).
#include "sampling.cuh"

#ifndef __CUDACC__  // the CPU build: keep float arithmetic in float, as on the GPU
using std::log2;
using std::sqrt;
#endif

// Level index of each box: floor(k0 + log2(sqrt(w h) / s0) + eps) clamped to
// [k_min, k_max], minus k_min; -1 when it is NaN (negative area: output 0), -2 for a
// row that fails roi_is_valid (output NaN). With one map every
// box gets level 0 (torchvision skips the mapping then). Same operation order as
// roilib.family.fpn_levels.
template <class A>
__device__ void multiscale_levels(long long n, const A* __restrict__ rois, int N, int n_levels, int k_min, int k_max,
                                  int k0, A s0, A eps, int* __restrict__ levels) {
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)blockDim.x * gridDim.x) {
    if (!roi_is_valid(rois + 5 * k, N)) {  // device boxes are checked here: NaN output
      levels[k] = -2;
      continue;
    }
    if (n_levels == 1) {
      levels[k] = 0;
      continue;
    }
    const A* r = rois + 5 * k;
    A area = (r[3] - r[1]) * (r[4] - r[2]);
    A lvl = floor(((A)k0 + log2(sqrt(area) / s0)) + eps);
    if (!(lvl == lvl)) {  // NaN: no level
      levels[k] = -1;
      continue;
    }
    lvl = lvl < (A)k_min ? (A)k_min : (lvl > (A)k_max ? (A)k_max : lvl);
    levels[k] = (int)lvl - k_min;
  }
}

template <class A>
__device__ __forceinline__ SampleGrid<A> level_grid(const A* roi, A scale, int PH, int PW, int sampling_ratio,
                                                    bool aligned) {
  A off = aligned ? (A)0.5 : (A)0;
  return sample_grid<A>(true, (int)roi[0], roi[1] * scale - off, roi[2] * scale - off, roi[3] * scale - off,
                        roi[4] * scale - off, PH, PW, sampling_ratio, !aligned);
}

// Forward: one work item per output element (k, c, ph, pw), on the box's level.
template <class T, class A>
__device__ void multiscale_forward(long long n, const long long* __restrict__ maps, const A* __restrict__ scales,
                                   const int* __restrict__ levels, const A* __restrict__ rois, int C, int PH, int PW,
                                   int sampling_ratio, int aligned, T* __restrict__ output) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C, k = i / PW / PH / C;
    int l = levels[k];
    if (l < 0) {
      store(output + i, l == -1 ? (A)0 : nan_of(A()));
      continue;
    }
    const T* base = (const T*)(size_t)maps[3 * l];
    int H = (int)maps[3 * l + 1], W = (int)maps[3 * l + 2];
    SampleGrid<A> g = level_grid(rois + 5 * k, scales[l], PH, PW, sampling_ratio, aligned != 0);
    const T* plane = base + ((long long)g.batch * C + c) * H * W;
    store(output + i, bin_average(plane, H, W, g, ph, pw));
  }
}

// Backward with atomics: one work item per output element scatters into its level's
// gradient (zeroed, in A).
template <class T, class A>
__device__ void multiscale_backward_atomic(long long n, const T* __restrict__ grad_output,
                                           const long long* __restrict__ grads, const A* __restrict__ scales,
                                           const int* __restrict__ levels, const A* __restrict__ rois, int C, int PH,
                                           int PW, int sampling_ratio, int aligned) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
    int pw = (int)(i % PW), ph = (int)(i / PW % PH);
    long long c = i / PW / PH % C, k = i / PW / PH / C;
    int l = levels[k];
    if (l < 0) continue;
    A* base = (A*)(size_t)grads[3 * l];
    int H = (int)grads[3 * l + 1], W = (int)grads[3 * l + 2];
    SampleGrid<A> g = level_grid(rois + 5 * k, scales[l], PH, PW, sampling_ratio, aligned != 0);
    A* plane = base + ((long long)g.batch * C + c) * H * W;
    A go = to_acc(grad_output[i]);
    for (int iy = 0; iy < g.gh; ++iy) {
      Tap<A> ty = tap_y(g, ph, iy, H);
      for (int ix = 0; ix < g.gw; ++ix) scatter_sample(plane, W, ty, tap_x(g, pw, ix, W), go, g.count);
    }
  }
}

#define MULTISCALE_ENTRY_POINTS(SUFFIX, T, A)                                                                       \
  extern "C" __global__ void multiscale_levels_##SUFFIX(long long n, const A* __restrict__ rois, int N,            \
                                                        int n_levels, int k_min, int k_max, int k0, A s0, A eps,    \
                                                        int* __restrict__ levels) {                                 \
    multiscale_levels<A>(n, rois, N, n_levels, k_min, k_max, k0, s0, eps, levels);                                  \
  }                                                                                                                 \
  extern "C" __global__ void multiscale_forward_##SUFFIX(                                                           \
      long long n, const long long* __restrict__ maps, const A* __restrict__ scales, const int* __restrict__ levels, \
      const A* __restrict__ rois, int C, int PH, int PW, int sampling_ratio, int aligned, T* __restrict__ output) {  \
    multiscale_forward<T, A>(n, maps, scales, levels, rois, C, PH, PW, sampling_ratio, aligned, output);             \
  }                                                                                                                 \
  extern "C" __global__ void multiscale_backward_atomic_##SUFFIX(                                                   \
      long long n, const T* __restrict__ grad_output, const long long* __restrict__ grads,                          \
      const A* __restrict__ scales, const int* __restrict__ levels, const A* __restrict__ rois, int C, int PH,      \
      int PW, int sampling_ratio, int aligned) {                                                                    \
    multiscale_backward_atomic<T, A>(n, grad_output, grads, scales, levels, rois, C, PH, PW, sampling_ratio,        \
                                     aligned);                                                                      \
  }

MULTISCALE_ENTRY_POINTS(f16, __half, float)
MULTISCALE_ENTRY_POINTS(f32, float, float)
MULTISCALE_ENTRY_POINTS(f64, double, double)

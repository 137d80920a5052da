// Arithmetic of one "good Broyden" update, shared by the CPU and CUDA kernels.
//
// Convention (DESIGN.md §2): the inverse-Jacobian estimate of the root function is
// H = -I + sum_i u_i v_i^T over the valid history slots i. One update from
// dz = z_new - z_old, dF = F(z_new) - F(z_old) and F = F(z_new) does
//   v_new = H^T dz,  u_new = (dz - H dF) / (v_new . dF),  H <- H + u_new v_new^T (ring slot),
//   step  = -H F.
// Every quantity is a combination of the per-slot dots a_i = dz.u_i, b_i = v_i.dF, c_i = v_i.F
// and of the rows u_i, v_i weighted by them, so a kernel reads each history row once (CPU:
// dots and weighted sums row by row) or twice (CUDA: all dots first, then the sums).
// The helpers below hold everything that is not a memory access, so the CPU tests cover
// the CUDA kernel's arithmetic too.
//
// NaN and Inf follow impflow.ops.reference.broyden_step_reference, which applies IEEE
// arithmetic to the definition, with a dropped update written as a zero pair:
//   * F not finite: v_new . F is not finite, so the update is dropped, and the zero pair's
//     term u_new (v_new . F) = 0 * (0 . F) is NaN in every element: the whole step is NaN.
//     The kernels get it from one more dot, 0 . F (0, or NaN when F holds a NaN or an Inf);
//   * dz, dF or a history row not finite: the update is dropped (the denominator or v_new . F
//     is not finite) and the step comes from the other pairs, NaN or Inf only where a kept
//     row makes it so;
//   * the overwritten slot enters v_new and u_new but not the step: the kernels leave it out
//     of the step's sums (never multiply it by 0, which would turn its Inf into NaN).
#pragma once


#if defined(__CUDACC__) || defined(__HIPCC__)
#define IMPFLOW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IMPFLOW_HOST_DEVICE inline
#endif

namespace impflow {

// Math helpers callable from host and device code alike (std:: is host-only under nvcc).
template <typename T>
IMPFLOW_HOST_DEVICE T abs_value(T x) { return x < T(0) ? -x : x; }

template <typename T> struct LargestFinite;
template <> struct LargestFinite<float> { static constexpr float value = 3.40282347e+38f; };
template <> struct LargestFinite<double> { static constexpr double value = 1.7976931348623157e+308; };

// False for NaN and +-Inf; a plain comparison, so that CPU loops using it still vectorise.
template <typename T>
IMPFLOW_HOST_DEVICE bool finite_value(T x) { return abs_value(x) <= LargestFinite<T>::value; }

// Smallest normal value: a denominator below it has lost all precision.
template <typename T> struct SmallestNormal;
template <> struct SmallestNormal<float> { static constexpr float value = 1.17549435e-38f; };
template <> struct SmallestNormal<double> { static constexpr double value = 2.2250738585072014e-308; };

// Scalars of one sample's update, from the per-slot dots.
template <typename acc_t>
struct BroydenCoefficients {
  acc_t inv_denom;  // 1 / (v_new . dF), 0 when the update is dropped
  acc_t vnew_dot_F; // v_new . F of the pair written: 0 . F = 0 (or NaN) when dropped
  bool valid;       // false: the update is dropped (denominator zero, tiny or not finite)
};

// Layout of the dots buffer of one sample (structure of arrays, so that loops over the slots
// read and write contiguously): [a_0..a_{n-1}, b_0..b_{n-1}, c_0..c_{n-1}, dz.dF, dz.F, 0.F].
IMPFLOW_HOST_DEVICE int broyden_dots_size(int n_valid) { return 3 * n_valid + 3; }

// From the sums over the old valid slots: sum_ab = sum_i a_i b_i, sum_ac = sum_i a_i c_i, and
// zero_dot_F = sum_j 0 * F_j (0 for a finite F, NaN otherwise).
template <typename acc_t>
IMPFLOW_HOST_DEVICE BroydenCoefficients<acc_t> broyden_coefficients_from_sums(acc_t sum_ab,
                                                                              acc_t sum_ac,
                                                                              acc_t dz_dot_dF,
                                                                              acc_t dz_dot_F,
                                                                              acc_t zero_dot_F) {
  const acc_t denom = sum_ab - dz_dot_dF;       // v_new . dF = -dz.dF + sum_i a_i b_i
  const acc_t vnew_dot_F = sum_ac - dz_dot_F;   // v_new . F  = -dz.F  + sum_i a_i c_i
  BroydenCoefficients<acc_t> out;
  // A zero or subnormal denominator means dz is (numerically) orthogonal to H^T dF: no
  // information, and dividing would give Inf/NaN. Skip the update rather than poison H.
  out.valid = finite_value(denom) && finite_value(vnew_dot_F) &&
              abs_value(denom) > SmallestNormal<acc_t>::value;
  out.inv_denom = out.valid ? acc_t(1) / denom : acc_t(0);
  // A dropped update writes the zero pair, whose term in the step is 0 * (0 . F).
  out.vnew_dot_F = out.valid ? vnew_dot_F : zero_dot_F;
  return out;
}

// From a dots buffer laid out as broyden_dots_size describes.
template <typename acc_t>
IMPFLOW_HOST_DEVICE BroydenCoefficients<acc_t> broyden_coefficients(const acc_t* dots, int n_valid) {
  const acc_t* a = dots;
  const acc_t* b = dots + n_valid;
  const acc_t* c = dots + 2 * n_valid;
  acc_t sum_ab = 0, sum_ac = 0;
  for (int i = 0; i < n_valid; ++i) {
    sum_ab += a[i] * b[i];
    sum_ac += a[i] * c[i];
  }
  return broyden_coefficients_from_sums(sum_ab, sum_ac, dots[3 * n_valid], dots[3 * n_valid + 1],
                                        dots[3 * n_valid + 2]);
}

// One element j of the new pair and of the step, given the row sums
//   sum_u_b = sum_i u_i[j] b_i,  sum_v_a = sum_i v_i[j] a_i  over the old valid slots, and
//   sum_u_c = sum_i u_i[j] c_i   over the old valid slots except the one being overwritten,
// and the sample's coefficients (passed as scalars, which keeps CPU loops vectorisable).
// A dropped update (valid false) gives the zero pair and the step's term 0 * vnew_dot_F.
template <typename acc_t>
IMPFLOW_HOST_DEVICE void broyden_element_scalars(acc_t dz, acc_t dF, acc_t F, acc_t sum_u_b,
                                                 acc_t sum_v_a, acc_t sum_u_c, acc_t inv_denom,
                                                 acc_t vnew_dot_F, bool valid, acc_t* u_new,
                                                 acc_t* v_new, acc_t* step) {
  // (dz - H dF) = dz + dF - sum_i u_i b_i ;  H^T dz = -dz + sum_i v_i a_i
  *u_new = valid ? (dz + dF - sum_u_b) * inv_denom : acc_t(0);
  *v_new = valid ? (-dz + sum_v_a) : acc_t(0);
  // -H_new F = F - sum_{kept i} u_i c_i - u_new (v_new . F)
  *step = F - sum_u_c - *u_new * vnew_dot_F;
}

template <typename acc_t>
IMPFLOW_HOST_DEVICE void broyden_element(acc_t dz, acc_t dF, acc_t F, acc_t sum_u_b, acc_t sum_v_a,
                                         acc_t sum_u_c, const BroydenCoefficients<acc_t>& k,
                                         acc_t* u_new, acc_t* v_new, acc_t* step) {
  broyden_element_scalars<acc_t>(dz, dF, F, sum_u_b, sum_v_a, sum_u_c, k.inv_denom, k.vnew_dot_F,
                                 k.valid, u_new, v_new, step);
}

}  // namespace impflow

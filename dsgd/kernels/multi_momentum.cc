// dsgd multi-tensor SGD kernels: one op call updates every variable of a group (on one device,
// or with DsgdMultiSgdAll on every local device).
//
// DsgdMultiSgd: for each variable i (in one pass over its memory, in place):
//   g = grad * scale[i]                        (scale: per variable, one for all, or none)
//   g = clip(g, -clipvalue, clipvalue)         (clipvalue > 0)
//   w = w - w * (weight_decay * lr)            (weight_decay > 0 and decay[i])
//   momentum: m = m * mu - g * lr;  w = w + m  (nesterov: w = w + (m * mu - g * lr))
//   plain:    w = w - g * lr
//   EMA:      a = e * a + (1 - e) * w;  if ema_overwrite: w = a
// This is the rule's C++ statement (UpdateSpan); dsgd/rules.py is the reference, and its docstring
// lists this kernel among its checked equivalents.  The order and the roundings follow rules.py and
// the `per_shard` implementation (float32 results are bit-identical to ResourceApplyKerasMomentum +
// friends); bfloat16 and float16 are computed in float32 and rounded once, float64 in double.
//
// DsgdMultiSumSq: sums of squares of the gradients, accumulated in double over fixed blocks
// (the result does not depend on threading), each added into its slot of a float32 vector.
// DsgdGlobalClipScale turns those (summed over the devices) into global_clipnorm's coefficient.
//
// DsgdMultiSgdAll / DsgdMultiSumSqAt are the same kernels fed by address, for every local
// device at once: one host int64 tensor of the gradients' addresses and element counts
// instead of N tensor inputs (an eager op call costs ~1.3 us per tensor input: 400 gradients
// on 8 devices, ~4 ms before any arithmetic), and DsgdMultiSgdAll takes the variable sets of
// all devices (by address, from DsgdVarSetAddress).  The logical CPU devices share the host's
// memory and one thread pool, and eight calls in a row pay eight thread-pool start-ups and
// tails (scripts/kernel_bandwidth.py: ~12% of the bandwidth).  Only dsgd's C++ dispatch
// (dispatch.cc) calls them: it reads the addresses of the components of DTensors it holds
// for the whole (synchronous) call and checks their dtype; the kernels check each count
// against the variable's.
//
// DsgdPackVars looks the variables (and slots) up once and returns a ref-counting handle to
// a DsgdVarSet that holds them and their mutexes in locking order: a step then costs no
// ResourceMgr lookup (~1 us per variable per device, measured) and no sort.  Variables are
// locked (all mutexes, in address order) for the whole update, and a buffer that is shared
// with a pending read (or in copy-on-read mode) is copied first, as TF's own training ops do
// (training_op_helpers.h: PrepareToUpdateVariable).
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/cancellation.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/env.h"
#include "tsl/profiler/lib/traceme.h"

namespace tensorflow {
namespace dsgd_kernels {

using shape_inference::InferenceContext;

// The positions of the kernels' small vectors and of the in-graph node's inputs, by name: the C++
// half of dsgd/kernels/abi.py (HYPER, META, GRAPH_INPUTS), in the same order
// (tests/test_kernel_abi.py checks that they agree).
enum Hyper : int { kHyperMomentum, kHyperWeightDecay, kHyperClipvalue, kHyperEmaMomentum, kHyperSize };
enum Meta : int {
  kMetaN, kMetaUseMomentum, kMetaNesterov, kMetaUseEma, kMetaDtype, kMetaMomentumDtype, kMetaLocalDevices,
  kMetaToken, kMetaCounter, kMetaSize
};
enum GraphInput : int {
  kGraphInputCondition, kGraphInputMeta, kGraphInputLr, kGraphInputScales, kGraphInputDecay, kGraphInputHyper,
  kGraphInputOverwrite, kGraphInputGrads
};

REGISTER_OP("DsgdPackVars")
    .Input("vars: N * resource")
    .Input("accums: NM * resource")    // N (momentum slots) or none
    .Input("averages: NA * resource")  // N (EMA slots) or none
    .Output("varset: resource")
    .Attr("N: int >= 1")
    .Attr("NM: int >= 0")
    .Attr("NA: int >= 0")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc("The variables (and their slots) of one DsgdMultiSgd call on this device, looked up once: "
         "a ref-counting handle to a DsgdVarSet, built once and passed every step.");

REGISTER_OP("DsgdMultiSgd")
    .Input("varset: resource")  // from DsgdPackVars: N variables (+ N momentum, + N EMA slots)
    .Input("grads: N * T")
    .Input("lr: float")        // scalar
    .Input("scales: float")    // [N], [1] (one for all) or [0] (no scaling)
    .Input("decay: bool")      // [N] (weight decay mask) or [0] (all decay)
    .Input("hyper: double")    // [4]: momentum, weight_decay, clipvalue (0: off), ema_momentum
    .Attr("N: int >= 1")
    .Attr("T: {float, double, bfloat16, half}")
    .Attr("Tmomentum: {float, double, bfloat16, half}")
    .Attr("use_momentum: bool = true")
    .Attr("nesterov: bool = false")
    .Attr("use_ema: bool = false")
    .Attr("ema_overwrite: bool = false")
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Multi-tensor SGD step (momentum, Nesterov, weight decay, clipping, EMA), in place.");

// The sums of squares: a float vector of the `size` attribute's length.
absl::Status SizeVectorShape(InferenceContext* c) {
  int size;
  TF_RETURN_IF_ERROR(c->GetAttr("size", &size));
  c->set_output(0, c->Vector(size));
  return absl::OkStatus();
}

REGISTER_OP("DsgdMultiSumSq")
    .Input("grads: N * T")
    .Input("index: int32")  // [N]: the output slot of each gradient's sum, in [0, size)
    .Output("sumsq: float")
    .Attr("N: int >= 1")
    .Attr("T: {float, double, bfloat16, half}")
    .Attr("size: int >= 1")
    .SetShapeFn(SizeVectorShape)
    .Doc("Sums of squares (accumulated in double): sumsq[index[i]] += sum(grads[i]^2); other slots 0.");

REGISTER_OP("DsgdMultiSumSqAt")
    .Input("grads: int64")  // [2N] addresses, then element counts
    .Input("index: int32")
    .Output("sumsq: float")
    .Attr("T: {float, double, bfloat16, half}")
    .Attr("size: int >= 1")
    .SetIsStateful()
    .SetShapeFn(SizeVectorShape)
    .Doc("DsgdMultiSumSq on gradients given by address (dsgd's C++ dispatch only).");

REGISTER_OP("DsgdGlobalClipScale")
    .Input("sumsq: float")  // [n]: per-variable sums of squares, summed over every device
    .Output("scale: float")
    .Attr("clipnorm: float")
    .Attr("inv_clipnorm: float")  // 1 / clipnorm rounded to float32, as a TF constant of it would be
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc("clipnorm * min(1 / sqrt(sum(sumsq)), 1 / clipnorm) in float32 (tf.clip_by_global_norm's "
         "coefficient); the sum in double.");

REGISTER_OP("DsgdIncrementAll")
    .Input("varsets: int64")  // [k]: DsgdVarSetAddress of variable sets of int64 scalars
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Adds 1 to every variable of the given variable sets (an optimizer's iterations on every "
         "local device, in one call; the caller holds the sets' handles).");

REGISTER_OP("DsgdVarSetAddress")
    .Input("varset: resource")
    .Output("address: int64")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc("The address of a DsgdVarSet, for DsgdMultiSgdAll; valid while the varset handle lives.");

REGISTER_OP("DsgdMultiSgdAll")
    .Input("varsets: int64")  // [D]: DsgdVarSetAddress of each device's set (n variables each)
    .Input("grads: int64")    // [2 D n]: addresses (device-major: set k's variable i at k n + i), then counts
    .Input("lr: float")
    .Input("scales: float")   // [n], [1] or [0]: per variable i, shared by the devices
    .Input("decay: bool")     // [n] or [0]
    .Input("hyper: double")
    .Input("sources: int32")  // [D n] or [0]: item j is a replica of item sources[j] (see SgdStep)
    .Attr("T: {float, double, bfloat16, half}")
    .Attr("Tmomentum: {float, double, bfloat16, half}")
    .Attr("use_momentum: bool = true")
    .Attr("nesterov: bool = false")
    .Attr("use_ema: bool = false")
    .Attr("ema_overwrite: bool = false")
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("DsgdMultiSgd over the variable sets of several devices in one call, gradients by address "
         "(dsgd's C++ dispatch only); each replica of a variable's shard is written from one computation.");

// Arithmetic type: double for double, float for everything else.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename C, typename T> inline C to_c(T x) { return static_cast<C>(x); }
template <typename T, typename C> inline T from_c(C x) { return static_cast<T>(x); }

constexpr int64_t kBlock = 1 << 14;  // elements per work unit of the sum of squares
constexpr int64_t kAheadBytes = 4096;  // software prefetch distance of the streaming loops

// Work is spread over the thread pool by element ranges of the concatenated variables.
inline void ParallelRange(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                          const std::function<void(int64_t, int64_t)>& fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  if (workers == nullptr || total * cost_per_unit < 200000) {  // not worth waking threads
    fn(0, total);
    return;
  }
  workers->ParallelFor(total, tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost_per_unit), fn);
}

struct Slices {
  std::vector<int64_t> offsets;  // size n + 1: start of each tensor in the concatenated range
  template <typename F>
  void ForEach(int64_t begin, int64_t end, F f) const {  // f(tensor, local_begin, local_end)
    int i = static_cast<int>(std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin()) - 1;
    for (; begin < end; ++i) {
      const int64_t stop = std::min(end, offsets[i + 1]);
      if (stop > begin) f(i, begin - offsets[i], stop - offsets[i]);
      begin = stop;
    }
  }
};

enum class Mom { kNone, kHeavy, kNesterov };

// The coefficients of one variable's update (everything but its buffers), in the arithmetic
// type C: the step's, and the variable's own norm-clip `scale`.
template <typename C>
struct Coefficients {
  C scale;          // norm-clip coefficient (1: none)
  C clip;           // clipvalue (+inf: off)
  C lr;
  C mu;             // momentum
  C wdlr;           // weight_decay * lr
  C ema;            // ema_momentum
  C one_minus_ema;  // 1 - ema_momentum
  bool overwrite;   // the EMA overwrites the weights this step
};

// The rule (dsgd/rules.py, the reference; this is its C++ statement) on elements [b, e) of one
// variable, in place.  Always inlined into UpdateRange (as it was with scalar parameters): a call
// per few cache lines would cost the loop its hoisted coefficients.
template <typename T, typename Tm, Mom kMom, bool kDecay, bool kEma>
__attribute__((always_inline)) inline void UpdateSpan(T* __restrict w, Tm* __restrict m, T* __restrict a,
                                                      const T* __restrict g, int64_t b, int64_t e,
                                                      const Coefficients<typename Compute<T>::type>& k) {
  using C = typename Compute<T>::type;
  const C scale = k.scale, clip = k.clip, lr = k.lr, mu = k.mu, wdlr = k.wdlr, ema = k.ema;
  const C one_minus_ema = k.one_minus_ema;
  const bool overwrite = k.overwrite;
  for (int64_t j = b; j < e; ++j) {
    C gj = to_c<C>(g[j]) * scale;
    gj = gj > clip ? clip : gj;  // clip = +inf when off: identity, NaN stays NaN
    gj = gj < -clip ? -clip : gj;
    C wj = to_c<C>(w[j]);
    if (kDecay) wj = wj - wj * wdlr;
    if (kMom == Mom::kNone) {
      wj = wj - gj * lr;
    } else {
      // momentum kept in its own dtype, computed in C
      const C mj = to_c<C>(m[j]) * mu - gj * lr;
      const Tm mj_t = from_c<Tm>(mj);
      m[j] = mj_t;
      const C mj_r = to_c<C>(mj_t);  // the stored value, as a separate update op would read it
      wj = wj + (kMom == Mom::kNesterov ? mj_r * mu - gj * lr : mj_r);
    }
    T wt = from_c<T>(wj);
    if (kEma) {
      const T at = from_c<T>(ema * to_c<C>(a[j]) + one_minus_ema * to_c<C>(wt));
      a[j] = at;
      if (overwrite) wt = at;
    }
    w[j] = wt;
  }
}

// UpdateSpan a few cache lines at a time, each stream prefetched kAheadBytes ahead: the
// hardware prefetchers stop at 4 KB page boundaries, and with four to seven streams per core
// each new page of each stream otherwise starts with a demand miss (fresh processes, A/B in
// turns: bert-mini 2x4 with decay + global norm + EMA ~10% faster, one-big on 1 device ~15%;
// arithmetic and results unchanged).
template <typename T, typename Tm, Mom kMom, bool kDecay, bool kEma>
void UpdateRange(T* __restrict w, Tm* __restrict m, T* __restrict a, const T* __restrict g, int64_t b,
                 int64_t e, const Coefficients<typename Compute<T>::type>& k) {
  constexpr int64_t kStep = 256 / sizeof(T);  // elements per round: 4 cache lines of w
  constexpr int64_t kLine = 64 / sizeof(T), kLineM = 64 / sizeof(Tm);
  constexpr int64_t kAhead = kAheadBytes / sizeof(T);
  // a local copy: the buffers (restrict) cannot alias it, so its values are loaded once, not per round
  const Coefficients<typename Compute<T>::type> c = k;
  int64_t j = b;
  for (; j + kStep <= e; j += kStep) {
    for (int64_t l = 0; l < kStep; l += kLine) {  // prefetches never fault: the end needs no check
      __builtin_prefetch(g + j + l + kAhead);
      __builtin_prefetch(w + j + l + kAhead);
      if (kEma) __builtin_prefetch(a + j + l + kAhead);
    }
    if (kMom != Mom::kNone) {
      for (int64_t l = 0; l < kStep; l += kLineM) __builtin_prefetch(m + j + l + kAhead);
    }
    UpdateSpan<T, Tm, kMom, kDecay, kEma>(w, m, a, g, j, j + kStep, c);
  }
  UpdateSpan<T, Tm, kMom, kDecay, kEma>(w, m, a, g, j, e, c);
}

// The one signature of the update: an UpdateRange instantiation, picked once per call.
template <typename T, typename Tm>
using UpdateFn = void (*)(T*, Tm*, T*, const T*, int64_t, int64_t, const Coefficients<typename Compute<T>::type>&);

template <typename T, typename Tm, Mom kMom>
UpdateFn<T, Tm> PickUpdate2(bool decay, bool ema) {
  if (decay) return ema ? &UpdateRange<T, Tm, kMom, true, true> : &UpdateRange<T, Tm, kMom, true, false>;
  return ema ? &UpdateRange<T, Tm, kMom, false, true> : &UpdateRange<T, Tm, kMom, false, false>;
}

template <typename T, typename Tm>
UpdateFn<T, Tm> PickUpdate(Mom mom, bool decay, bool ema) {
  switch (mom) {
    case Mom::kNone: return PickUpdate2<T, Tm, Mom::kNone>(decay, ema);
    case Mom::kHeavy: return PickUpdate2<T, Tm, Mom::kHeavy>(decay, ema);
    default: return PickUpdate2<T, Tm, Mom::kNesterov>(decay, ema);
  }
}

// The variables of one DsgdMultiSgd call on one device: vars, then momentum slots, then EMA
// slots (each N or none), referenced for as long as the handle lives, and their mutexes in
// address order (each once), the order every call locks them in.
class VarSet;

// Every VarSet alive in the process: an address baked into a traced function (the in-graph
// step) is used only while its set lives, so a stale one is an error, never a dangling pointer.
class LiveSets {
 public:
  static void Add(const VarSet* s) {
    mutex_lock l(mu());
    set().insert(s);
  }
  static void Remove(const VarSet* s) {
    mutex_lock l(mu());
    set().erase(s);
  }
  // The set at `address`, referenced, or null if no live set is there.
  static VarSet* RefIfLive(int64_t address);

 private:
  static mutex& mu() {
    static mutex* m = new mutex;
    return *m;
  }
  static std::unordered_set<const VarSet*>& set() {
    static auto* s = new std::unordered_set<const VarSet*>;
    return *s;
  }
};

class VarSet : public ResourceBase {
 public:
  VarSet(std::vector<core::RefCountPtr<Var>> vars, int n, int nm, int na)
      : vars_(std::move(vars)), n_(n), nm_(nm), na_(na) {
    LiveSets::Add(this);
  }
  ~VarSet() override { LiveSets::Remove(this); }
  bool RefUnlessDying() const { return TryRef(); }  // for LiveSets

  absl::Status Init() {
    for (const auto& v : vars_) mus_.push_back(v->mu());
    std::sort(mus_.begin(), mus_.end());
    if (std::adjacent_find(mus_.begin(), mus_.end()) != mus_.end())
      return absl::InvalidArgumentError("the same variable (or slot) is packed twice into one DsgdVarSet");
    return absl::OkStatus();
  }

  int n() const { return n_; }
  bool has_momentum() const { return nm_ > 0; }
  bool has_average() const { return na_ > 0; }
  Var* var(int i) const { return vars_[i].get(); }
  Var* momentum(int i) const { return vars_[n_ + i].get(); }
  Var* average(int i) const { return vars_[n_ + nm_ + i].get(); }
  const std::vector<mutex*>& mutexes() const { return mus_; }
  std::string DebugString() const override {
    return absl::StrCat("DsgdVarSet(", n_, " variables, ", nm_, " momentum, ", na_, " EMA slots)");
  }

 private:
  std::vector<core::RefCountPtr<Var>> vars_;
  std::vector<mutex*> mus_;
  int n_, nm_, na_;
};

VarSet* LiveSets::RefIfLive(int64_t address) {
  auto* p = reinterpret_cast<VarSet*>(static_cast<intptr_t>(address));
  mutex_lock l(mu());
  // in the registry: its memory is valid under the lock; TryRef fails once it is being destroyed
  if (set().count(p) == 0 || !p->RefUnlessDying()) return nullptr;
  return p;
}

// Variable sets given by address (DsgdVarSetAddress; the caller holds their handles), each
// referenced for the call.
absl::Status SetsByAddress(const Tensor& a, std::vector<core::RefCountPtr<VarSet>>* sets) {
  if (a.dims() != 1 || a.NumElements() == 0) {
    return absl::InvalidArgumentError("varsets must be a non-empty int64 vector");
  }
  for (int64_t k = 0; k < a.NumElements(); ++k) {
    auto* p = reinterpret_cast<VarSet*>(static_cast<intptr_t>(a.flat<int64_t>()(k)));
    if (p == nullptr) return absl::InvalidArgumentError("a null variable set");
    p->Ref();
    sets->emplace_back(p);
  }
  return absl::OkStatus();
}

// Holds every mutex of one or more VarSets (locked in address order, each once) until destroyed.
class LockAll {
 public:
  explicit LockAll(const std::vector<core::RefCountPtr<VarSet>>& sets) {
    if (sets.size() == 1) {
      mus_ = sets[0]->mutexes();
    } else {
      for (const auto& s : sets) mus_.insert(mus_.end(), s->mutexes().begin(), s->mutexes().end());
      std::sort(mus_.begin(), mus_.end());
      mus_.erase(std::unique(mus_.begin(), mus_.end()), mus_.end());
    }
    for (mutex* mu : mus_) mu->lock();
  }
  ~LockAll() {
    for (auto it = mus_.rbegin(); it != mus_.rend(); ++it) (*it)->unlock();
  }

 private:
  std::vector<mutex*> mus_;
};

// The variable's tensor, copied first if its buffer is shared (a read still holds it) or the
// variable is in copy-on-read mode.  Requires the variable's mutex held.
absl::Status Writable(OpKernelContext* ctx, Var* var, DataType dtype, const TensorShape* shape, int64_t count,
                      const char* what, int index, Tensor** out) {
  if (!var->is_initialized) {
    return absl::FailedPreconditionError(absl::StrCat(what, " ", index, " is not initialized"));
  }
  Tensor* t = var->tensor();
  if (t->dtype() != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", index, " has dtype ", DataTypeString(t->dtype()),
                                                   ", expected ", DataTypeString(dtype)));
  }
  if (shape != nullptr ? t->shape() != *shape : t->NumElements() != count) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", index, " has shape ", t->shape().DebugString(),
                                                   ", its gradient ",
                                                   shape != nullptr ? shape->DebugString() : absl::StrCat(count, " elements")));
  }
  if (var->copy_on_read_mode.load() || !t->RefCountIsOne()) {
    Tensor tmp;
    AllocatorAttributes attr;
    attr.set_gpu_compatible(true);
    attr.set_nic_compatible(true);
    TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &tmp, attr));
    if (t->TotalBytes() > 0) {
      std::memcpy(const_cast<char*>(tmp.tensor_data().data()), t->tensor_data().data(), t->TotalBytes());
    }
    *t = tmp;
  }
  *out = t;
  return absl::OkStatus();
}

template <typename T>
T* Data(Tensor* t) {
  return reinterpret_cast<T*>(const_cast<char*>(t->tensor_data().data()));
}

// A call's gradients: N tensor inputs from `first`, or (by_address) one int64 input [2N] at
// `first` holding N addresses and then N element counts.
template <typename T>
struct Grads {
  std::vector<const T*> data;
  std::vector<int64_t> count;
  std::vector<const TensorShape*> shape;  // null when given by address
  int next_input = 0;                     // the first input after the gradients

  absl::Status Read(OpKernelContext* ctx, bool by_address, int first, int n_tensors) {
    if (!by_address) {
      for (int i = 0; i < n_tensors; ++i) {
        const Tensor& g = ctx->input(first + i);
        data.push_back(g.flat<T>().data());
        count.push_back(g.NumElements());
        shape.push_back(&g.shape());
      }
      next_input = first + n_tensors;
      return absl::OkStatus();
    }
    const Tensor& a = ctx->input(first);
    if (a.dims() != 1 || a.NumElements() % 2 != 0 || a.NumElements() == 0) {
      return absl::InvalidArgumentError("grads must be an int64 vector [2N]: addresses, then element counts");
    }
    const int n = static_cast<int>(a.NumElements() / 2);
    const auto v = a.flat<int64_t>();
    for (int i = 0; i < n; ++i) {
      if (v(i) == 0 || v(n + i) < 0) return absl::InvalidArgumentError(absl::StrCat("gradient ", i, ": bad address or count"));
      data.push_back(reinterpret_cast<const T*>(static_cast<intptr_t>(v(i))));
      count.push_back(v(n + i));
      shape.push_back(nullptr);
    }
    next_input = first + 1;
    return absl::OkStatus();
  }
  int n() const { return static_cast<int>(data.size()); }
};

// The (variable, momentum) dtype pairs of the SGD kernels: X(T, Tmomentum) for each (the
// registrations and the in-graph kernel's runtime dispatch both expand it).
#define DSGD_SGD_DTYPES(X)                                                           \
  X(float, float) X(double, double) X(Eigen::bfloat16, Eigen::bfloat16) X(Eigen::bfloat16, float) \
  X(Eigen::half, Eigen::half) X(Eigen::half, float)

// Elements per block of a computed update that is copied to the shard's replicas before the next
// block: the fresh results are still in the core's cache (w, m and the average: 96 KB of float32).
constexpr int64_t kReplicaBlock = 8192;

// A replica's block written with non-temporal stores where the destination is 16-byte aligned (a
// block's start is, in TensorFlow's 64-byte aligned buffers): the replica's old values are never
// read, so a cached store's read-for-ownership would double its traffic.  The caller fences.
inline void StreamCopy(void* dst_v, const void* src_v, int64_t bytes) {
  char* dst = static_cast<char*>(dst_v);
  const char* src = static_cast<const char*>(src_v);
  int64_t i = 0;
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    for (; i + 64 <= bytes; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
  }
#endif
  if (i < bytes) std::memcpy(dst + i, src + i, bytes - i);
}

// Orders this thread's non-temporal stores before what follows (its part of the work is done).
inline void StoreFence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The update of one call: the variables of `sets` (set j / n's variable j % n for gradient j),
// in place, all checked before any is written.  Shared by DsgdMultiSgd(All) and the in-graph
// step (GraphSgdOp).
//
// Replicas (`sources`, nullable, one entry per item): item j holds the same shard of the same
// variable as item sources[j] (its own index for the item that computes).  A replicated shard has
// the same weights, slots and gradient on every device that holds it (DTensor's invariant, and an
// all-reduce hands every device the same sum), so the rule runs once per shard and its results
// are copied into the other replicas' weights and slots, block by block while they are in cache:
// per element and replica 8 bytes written (w, m) instead of 12 read and 8 written.  The replicas'
// gradients are not read.
template <typename T, typename Tm>
void SgdStep(OpKernelContext* ctx, const Grads<T>& grads, const std::vector<core::RefCountPtr<VarSet>>& sets,
             const Tensor& lr_t, const Tensor& scales_t, const Tensor& decay_t, const Tensor& hyper_t,
             bool use_momentum, bool nesterov, bool use_ema, bool ema_overwrite, const int32_t* sources = nullptr) {
  using C = typename Compute<T>::type;
  const int total = grads.n();
  const int n = sets[0]->n();  // variables per set; item j is set j / n's variable j % n
  const bool has_m = use_momentum, has_a = use_ema;
  for (const auto& set : sets) {
    OP_REQUIRES(ctx, set->n() == n && static_cast<int64_t>(n) * static_cast<int64_t>(sets.size()) == total,
                absl::InvalidArgumentError(absl::StrCat("got ", sets.size(), " variable sets of ", set->n(),
                                                        " variables for ", total, " gradients")));
    OP_REQUIRES(ctx, !has_m || set->has_momentum(),
                absl::InvalidArgumentError("use_momentum, but the variable set has no momentum slots"));
    OP_REQUIRES(ctx, !has_a || set->has_average(),
                absl::InvalidArgumentError("use_ema, but the variable set has no EMA slots"));
  }
  OP_REQUIRES(ctx, lr_t.NumElements() == 1, absl::InvalidArgumentError("lr must be a scalar"));
  const int64_t ns = scales_t.NumElements();
  OP_REQUIRES(ctx, ns == 0 || ns == 1 || ns == n,
              absl::InvalidArgumentError(absl::StrCat("scales must have 0, 1 or ", n, " elements, got ", ns)));
  const int64_t nd = decay_t.NumElements();
  OP_REQUIRES(ctx, nd == 0 || nd == n,
              absl::InvalidArgumentError(absl::StrCat("decay must have 0 or ", n, " elements, got ", nd)));
  OP_REQUIRES(ctx, hyper_t.NumElements() == kHyperSize,
              absl::InvalidArgumentError(absl::StrCat("hyper must have ", kHyperSize, " elements")));
  const float* scales = scales_t.flat<float>().data();
  const bool* decay = decay_t.flat<bool>().data();
  const double* hyper = hyper_t.flat<double>().data();

  Coefficients<C> step;
  step.scale = C(1);
  step.lr = static_cast<C>(lr_t.flat<float>()(0));
  step.mu = static_cast<C>(hyper[kHyperMomentum]);
  const C wd = static_cast<C>(hyper[kHyperWeightDecay]);
  step.wdlr = wd * step.lr;  // as per_shard: one coefficient, then w - w * coefficient
  step.clip = hyper[kHyperClipvalue] > 0 ? static_cast<C>(hyper[kHyperClipvalue])
                                          : std::numeric_limits<C>::infinity();
  step.ema = static_cast<C>(hyper[kHyperEmaMomentum]);
  step.one_minus_ema = C(1) - step.ema;
  step.overwrite = has_a && ema_overwrite;
  const Mom mom = !has_m ? Mom::kNone : (nesterov ? Mom::kNesterov : Mom::kHeavy);

  LockAll locked(sets);

  struct Item {
    T* w;
    Tm* m;
    T* a;
    const T* g;
    Coefficients<C> k;  // the step's, with this variable's scale
    bool decay;
  };
  std::vector<Item> items(total);
  Slices slices;
  slices.offsets.resize(total + 1);
  slices.offsets[0] = 0;
  const DataType t_dtype = DataTypeToEnum<T>::value, m_dtype = DataTypeToEnum<Tm>::value;
  for (int j = 0; j < total; ++j) {
    const VarSet* set = sets[j / n].get();
    const int i = j % n;
    const TensorShape* gshape = grads.shape[j];
    const int64_t gcount = grads.count[j];
    Tensor* w;
    OP_REQUIRES_OK(ctx, Writable(ctx, set->var(i), t_dtype, gshape, gcount, "variable", i, &w));
    Item& it = items[j];
    it.w = Data<T>(w);
    it.g = grads.data[j];
    it.m = nullptr;
    it.a = nullptr;
    if (has_m) {
      Tensor* m;
      OP_REQUIRES_OK(ctx, Writable(ctx, set->momentum(i), m_dtype, gshape, gcount, "momentum slot", i, &m));
      it.m = Data<Tm>(m);
    }
    if (has_a) {
      Tensor* a;
      OP_REQUIRES_OK(ctx, Writable(ctx, set->average(i), t_dtype, gshape, gcount, "EMA slot", i, &a));
      it.a = Data<T>(a);
    }
    it.k = step;
    it.k.scale = ns == 0 ? C(1) : static_cast<C>(scales[ns == 1 ? 0 : i]);
    it.decay = wd != C(0) && (nd == 0 || decay[i]);
  }
  // the items that compute (all, without sources), and each one's replicas
  std::vector<int> computing;
  std::vector<std::vector<int>> replicas(total);
  for (int j = 0; j < total; ++j) {
    const int src = sources == nullptr ? j : sources[j];
    OP_REQUIRES(ctx, src >= 0 && src < total && (sources == nullptr || sources[src] == src) && src % n == j % n &&
                         grads.count[src] == grads.count[j],
                absl::InvalidArgumentError(absl::StrCat("sources[", j, "] = ", src, " is not an item that computes "
                                                        "the same variable's shard")));
    if (src == j) {
      computing.push_back(j);
    } else {
      replicas[src].push_back(j);
    }
  }
  slices.offsets.resize(computing.size() + 1);
  for (size_t c = 0; c < computing.size(); ++c) slices.offsets[c + 1] = slices.offsets[c] + grads.count[computing[c]];
  const UpdateFn<T, Tm> with_decay = PickUpdate<T, Tm>(mom, true, has_a);
  const UpdateFn<T, Tm> without_decay = PickUpdate<T, Tm>(mom, false, has_a);
  const int64_t copies = total - static_cast<int64_t>(computing.size());
  const int64_t state_bytes = (has_m ? sizeof(Tm) : 0) + (has_a ? 2 : 1) * sizeof(T);  // w, m, a: written per replica
  const int64_t bytes_per_elem = (has_m ? 2 * sizeof(Tm) : 0) + (has_a ? 2 : 0) * sizeof(T) + 3 * sizeof(T) +
                                 (computing.empty() ? 0 : copies * state_bytes / static_cast<int64_t>(computing.size()));
  ParallelRange(ctx, slices.offsets[computing.size()], bytes_per_elem, [&](int64_t begin, int64_t end) {
    slices.ForEach(begin, end, [&](int c, int64_t b, int64_t e) {
      const Item& it = items[computing[c]];
      const UpdateFn<T, Tm> update = it.decay ? with_decay : without_decay;
      const std::vector<int>& reps = replicas[computing[c]];
      if (reps.empty()) {
        update(it.w, it.m, it.a, it.g, b, e, it.k);
        return;
      }
      for (int64_t bb = b; bb < e; bb += kReplicaBlock) {
        const int64_t ee = std::min(e, bb + kReplicaBlock);
        update(it.w, it.m, it.a, it.g, bb, ee, it.k);
        for (int r : reps) {
          const Item& rep = items[r];
          StreamCopy(rep.w + bb, it.w + bb, (ee - bb) * sizeof(T));
          if (has_m) StreamCopy(rep.m + bb, it.m + bb, (ee - bb) * sizeof(Tm));
          if (has_a) StreamCopy(rep.a + bb, it.a + bb, (ee - bb) * sizeof(T));
        }
      }
      StoreFence();
    });
  });
}

template <typename T, typename Tm>
class MultiSgdOp : public OpKernel {
 public:
  explicit MultiSgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    by_address_ = ctx->def().op() == "DsgdMultiSgdAll";
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_momentum", &use_momentum_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_ema", &use_ema_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ema_overwrite", &ema_overwrite_));
  }

  void Compute(OpKernelContext* ctx) override {
    Grads<T> grads;
    if (by_address_) {
      OP_REQUIRES_OK(ctx, grads.Read(ctx, true, 1, 0));
    } else {
      int g0, g1;
      OP_REQUIRES_OK(ctx, ctx->op_kernel().InputRange("grads", &g0, &g1));
      OP_REQUIRES_OK(ctx, grads.Read(ctx, false, g0, g1 - g0));
    }
    const int g1 = grads.next_input;
    std::vector<core::RefCountPtr<VarSet>> sets;
    if (by_address_) {  // variable sets from DsgdVarSetAddress (the caller holds the handles)
      OP_REQUIRES_OK(ctx, SetsByAddress(ctx->input(0), &sets));
    } else {
      VarSet* set_raw = nullptr;
      OP_REQUIRES_OK(ctx, LookupResource<VarSet, false>(ctx, HandleFromInput(ctx, 0), &set_raw));
      sets.emplace_back(set_raw);
    }
    const int32_t* sources = nullptr;
    if (by_address_) {
      const Tensor& sources_t = ctx->input(g1 + 4);
      OP_REQUIRES(ctx, sources_t.NumElements() == 0 || sources_t.NumElements() == grads.n(),
                  absl::InvalidArgumentError(absl::StrCat("sources must have 0 or ", grads.n(), " elements")));
      if (sources_t.NumElements() > 0) sources = sources_t.flat<int32_t>().data();
    }
    SgdStep<T, Tm>(ctx, grads, sets, ctx->input(g1), ctx->input(g1 + 1), ctx->input(g1 + 2), ctx->input(g1 + 3),
                   use_momentum_, nesterov_, use_ema_, ema_overwrite_, sources);
  }

 private:
  bool by_address_;
  bool use_momentum_;
  bool nesterov_;
  bool use_ema_;
  bool ema_overwrite_;
};

// The whole step inside a tf.function (on a DTensor mesh or plain variables): an `Assert` node
// whose `_kernel` attribute is "dsgd_sgd" runs this kernel instead of TensorFlow's.  Why Assert:
// custom ops have no DTensor SPMD expander (DTensor refuses them, or all-gathers their resource
// inputs), while Assert's expander is a no-op that keeps every input's layout, so on each device
// this kernel gets that device's shards of the gradients and its own variable handles; Assert is
// stateful (never pruned) and takes a list of any types.  The condition is ignored.
// data (inputs 1..., GraphInput; meta's fields are Meta's, hyper's Hyper's):
//   meta int64 [kMetaSize], lr float [], scales float [n|1|0], decay bool [n|0], hyper double [kHyperSize],
//   ema_overwrite bool [], grads n * T, vars n * resource, the counter's resource when meta[kMetaCounter],
//   sets int64 [2 * local]: (device index, DsgdVarSet address) for each local device,
//   replicas int32 [local * n] or [0]: for the device at position p of the sets and variable i, the
//     position of the device whose copy computes that shard (SgdStep's replicas)
//
// The counter (the optimizer's iterations, an int64 scalar variable) is incremented by the step
// itself, on every device's copy, after the update and only when it succeeded: a step that fails
// before the node (a NaN caught by check_numerics) leaves the counter as it leaves the weights,
// where a separate increment ran whenever DTensor scheduled it.
//
// The variables and their slots come packed (DsgdPackVars, once, when the step is traced; the
// optimizer holds the sets) and are found by address, checked live (LiveSets): the slots are
// private to the optimizer, and as captured inputs they were a third of the function's inputs,
// which DTensor pays for on every call (~10 us per input on 1 device, more on 8).  The
// variables' handles stay inputs so that TensorFlow orders the step after the reads that
// produced the gradients and before later reads; the kernel does not use them.
//
// One update for all local devices.  DTensor runs a function's program once per device of the
// mesh (the copies share the call's step id), so a step has one copy of this node per local
// device.  Run separately, those copies are eight small kernels on two cores, each with its own
// thread-pool start-up and tail (bert-mini on batch=2,model=4: ~0.55 of the copy roofline); so
// the node is asynchronous: each copy checks its inputs and joins the step's gathering (keyed by
// step id, loop frame and iteration, and node name), and the last to arrive runs one SgdStep over
// every device's variables -- as the eager DsgdMultiSgdAll does -- and completes them all.  (The
// key has the node's token too: two nodes of one call in separate function bodies may share a
// name, a frame and an iteration.)  No thread waits: a copy that has joined returns its thread
// to the executor.  Errors of any copy fail every copy; a cancelled copy fails every copy of its
// gathering, those waiting and those still to come (a cancellation can run its callbacks before
// a copy that registered one has joined: without the mark it left, that copy would wait for ever).
// A status that follows from another error (a copy cancelled or failed because another failed),
// marked as TensorFlow marks its own (tsl::StatusGroup::MakeDerived's payload): when the step's
// statuses are summarized, the root cause -- a NaN caught by check_numerics -- is the one raised.
// Test-only fault injection, defined at the end of the file.
struct FaultInjection {
  static void BeforeJoin();
};

absl::Status Derived(absl::Status s) {
  s.SetPayload("type.googleapis.com/tensorflow.DerivedStatus", absl::Cord(""));
  return s;
}

struct Waiting {  // one copy of the node in a gathering
  OpKernelContext* ctx;
  AsyncOpKernel::DoneCallback done;
  absl::Status status;                // the copy's own checks
  core::RefCountPtr<VarSet> set;      // this device's variables and slots
  CancellationManager* cm = nullptr;
  CancellationToken token = CancellationManager::kInvalidToken;
};

class Gatherings {
 public:
  static Gatherings* Global() {
    static Gatherings* g = new Gatherings;
    return g;
  }
  // Adds a copy; returns every copy (this one last) when it completes the gathering, else none.
  // A copy of a cancelled gathering is not added: it comes back alone, its status Cancelled.
  std::vector<Waiting> Join(const std::string& key, int expected, Waiting w) {
    std::vector<Waiting> all;
    mutex_lock l(mu_);
    if (cancelled_.count(key) != 0) {
      w.status = Derived(absl::CancelledError("dsgd_sgd: the step was cancelled before this device joined the others"));
      all.push_back(std::move(w));
      return all;
    }
    auto& list = pending_[key];
    list.push_back(std::move(w));
    if (static_cast<int>(list.size()) >= expected) {
      all = std::move(list);
      pending_.erase(key);
    }
    return all;
  }
  // A copy's step was cancelled: the gathering can no longer complete.  Returns the copies waiting
  // in it (to be failed) and marks it, so that copies joining later fail at once.  The mark stays
  // (one per cancelled gathering; a late callback may also mark one that completed): keys hold
  // the step id, so a mark never matches another step.
  std::vector<Waiting> Cancel(const std::string& key) {
    std::vector<Waiting> waiting;
    mutex_lock l(mu_);
    auto it = pending_.find(key);
    if (it != pending_.end()) {
      waiting = std::move(it->second);
      pending_.erase(it);
    }
    if (cancelled_.size() >= kMaxMarks) cancelled_.clear();  // bounded; old steps are long done
    cancelled_.insert(key);
    return waiting;
  }

 private:
  static constexpr size_t kMaxMarks = 1 << 16;
  mutex mu_;
  std::unordered_map<std::string, std::vector<Waiting>> pending_ TF_GUARDED_BY(mu_);
  std::unordered_set<std::string> cancelled_ TF_GUARDED_BY(mu_);
};

class GraphSgdOp : public AsyncOpKernel {
 public:
  static constexpr const char* kTraceType = "DsgdSgdStep";  // the op type profiles show for the update

  explicit GraphSgdOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {}

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    int local = 1;
    core::RefCountPtr<VarSet> set;
    absl::Status status = Check(ctx, &set, &local);
    if (local <= 1) {  // one device (or inputs too broken to say): run here
      if (status.ok()) {
        std::vector<core::RefCountPtr<VarSet>> sets;
        sets.push_back(std::move(set));
        Run(ctx, {ctx}, sets);
      } else {
        ctx->SetStatus(status);
      }
      done();
      return;
    }
    const auto fi = ctx->frame_iter();
    const std::string key = absl::StrCat(ctx->step_id(), "/", fi.frame_id, "/", fi.iter_id, "/", def().name(), "/",
                                         ctx->input(kGraphInputMeta).flat<int64_t>()(kMetaToken));
    Waiting w{ctx, std::move(done), status, std::move(set)};
    // register for cancellation before joining, so a waiting copy can always be released
    CancellationManager* cm = ctx->cancellation_manager();
    if (cm != nullptr) {
      w.cm = cm;
      w.token = cm->get_cancellation_token();
      if (!cm->RegisterCallback(w.token, [key]() { CancelGathering(key); })) {
        CancelGathering(key);  // the others' managers may not be this one
        ctx->SetStatus(Derived(absl::CancelledError("dsgd_sgd: the step was cancelled")));
        w.done();
        return;
      }
    }
    FaultInjection::BeforeJoin();  // test-only; nothing when unset (see the end of the file)
    std::vector<Waiting> all = Gatherings::Global()->Join(key, local, std::move(w));
    if (all.empty()) return;  // another copy completes this one
    for (auto& x : all) {
      if (x.cm != nullptr) x.cm->TryDeregisterCallback(x.token);  // false: its callback only marks a completed gathering
    }
    for (auto& x : all) {
      if (!x.status.ok()) {
        status = x.status;
        break;
      }
    }
    if (status.ok() && static_cast<int>(all.size()) != local) {
      status = absl::InternalError(absl::StrCat("dsgd_sgd: ", all.size(), " copies for ", local, " local devices"));
    }
    if (status.ok()) {
      std::vector<core::RefCountPtr<VarSet>> sets;
      std::vector<OpKernelContext*> ctxs;
      for (auto& x : all) {
        ctxs.push_back(x.ctx);
        sets.push_back(std::move(x.set));
      }
      Run(ctx, ctxs, sets);  // on this (the last) copy's thread and thread pool
      status = ctx->status();
    }
    for (auto& x : all) {
      // the copy whose own check failed reports it; the others' failure follows from it
      if (!status.ok()) x.ctx->SetStatus(x.status.ok() ? Derived(status) : x.status);
      x.done();  // this copy's last: `ctx` may be gone after its own done
    }
  }

 private:
  // Fails the copies waiting in a gathering that can no longer complete; later ones fail on joining.
  static void CancelGathering(const std::string& key) {
    for (auto& x : Gatherings::Global()->Cancel(key)) {
      if (x.cm != nullptr) x.cm->TryDeregisterCallback(x.token);  // never blocks (false while its cm cancels)
      x.ctx->SetStatus(
          Derived(absl::CancelledError("dsgd_sgd: the step was cancelled while this device waited for the others")));
      x.done();
    }
  }

  // This copy's inputs checked and its variable set found; `local` from meta when readable.
  static absl::Status Check(OpKernelContext* ctx, core::RefCountPtr<VarSet>* out, int* local) {
    if (ctx->num_inputs() < kGraphInputGrads + 3) {
      return absl::InvalidArgumentError("dsgd_sgd: too few inputs (this Assert was not built by dsgd)");
    }
    const Tensor& meta_t = ctx->input(kGraphInputMeta);
    if (meta_t.dtype() != DT_INT64 || meta_t.NumElements() != kMetaSize) {
      return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: meta must be int64 [", kMetaSize, "]"));
    }
    const auto meta = meta_t.flat<int64_t>();
    *local = static_cast<int>(meta(kMetaLocalDevices));
    const int n = static_cast<int>(meta(kMetaN));
    const bool use_m = meta(kMetaUseMomentum) != 0, use_ema = meta(kMetaUseEma) != 0;
    const DataType t = static_cast<DataType>(meta(kMetaDtype));
    if (n < 1 || ctx->num_inputs() != ReplicasInput(meta) + 1) {
      return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: ", ctx->num_inputs(), " inputs for ", n, " variables"));
    }
    for (int i = 0; i < n; ++i) {
      if (ctx->input_dtype(kGraphInputGrads + i) != t) {
        return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: gradient ", i, " has dtype ",
                                                       DataTypeString(ctx->input_dtype(kGraphInputGrads + i)),
                                                       ", expected ", DataTypeString(t)));
      }
    }
    if (meta(kMetaCounter) != 0 && ctx->input_dtype(CounterInput(meta)) != DT_RESOURCE) {
      return absl::InvalidArgumentError("dsgd_sgd: the counter must be a resource");
    }
    const Tensor& sets_t = ctx->input(SetsInput(meta));
    if (sets_t.dtype() != DT_INT64 || sets_t.dims() != 1 || sets_t.NumElements() != 2 * *local) {
      return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: sets must be int64 [2 * ", *local, "]"));
    }
    const auto pairs = sets_t.flat<int64_t>();
    const int me = ctx->device()->parsed_name().id;
    for (int k = 0; k < *local; ++k) {
      if (pairs(2 * k) != me) continue;
      VarSet* set = LiveSets::RefIfLive(pairs(2 * k + 1));
      if (set == nullptr) {
        return absl::FailedPreconditionError(
            "dsgd_sgd: the optimizer's variable set for this device is gone (a function traced by an optimizer "
            "that no longer exists); trace the step again");
      }
      out->reset(set);
      if (set->n() != n || set->has_momentum() != use_m || set->has_average() != use_ema) {
        return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: the variable set (", set->DebugString(),
                                                       ") does not match the step's ", n, " variables"));
      }
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: no variable set for device ", ctx->device()->name()));
  }

  // Input positions after the gradients and the variables' handles.
  template <typename M>
  static int CounterInput(const M& meta) {
    return kGraphInputGrads + 2 * static_cast<int>(meta(kMetaN));
  }
  template <typename M>
  static int SetsInput(const M& meta) {
    return CounterInput(meta) + (meta(kMetaCounter) != 0 ? 1 : 0);
  }
  template <typename M>
  static int ReplicasInput(const M& meta) {
    return SetsInput(meta) + 1;
  }

  // SgdStep's sources for the gathered copies (`ctxs` in the order they joined): the node's replica
  // map says, for each device of the sets (in their order) and variable, which device's copy computes
  // it; empty when nothing is replicated (or one copy runs alone).
  static absl::Status Sources(const std::vector<OpKernelContext*>& ctxs, int n, std::vector<int32_t>* out) {
    OpKernelContext* ctx = ctxs[0];
    const auto meta = ctx->input(kGraphInputMeta).flat<int64_t>();
    const Tensor& map_t = ctx->input(ReplicasInput(meta));
    const int local = static_cast<int>(meta(kMetaLocalDevices));
    if (map_t.NumElements() == 0 || ctxs.size() < 2) return absl::OkStatus();
    if (map_t.dtype() != DT_INT32 || map_t.NumElements() != static_cast<int64_t>(local) * n ||
        static_cast<int>(ctxs.size()) != local) {
      return absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: the replica map must be int32 [", local, " * ", n, "]"));
    }
    const auto pairs = ctx->input(SetsInput(meta)).flat<int64_t>();
    const auto map = map_t.flat<int32_t>();
    std::vector<int> ctx_at(local, -1);  // position in the sets -> index in ctxs
    for (int c = 0; c < local; ++c) {
      const int id = ctxs[c]->device()->parsed_name().id;
      for (int p = 0; p < local; ++p) {
        if (pairs(2 * p) == id) ctx_at[p] = c;
      }
    }
    out->assign(static_cast<size_t>(local) * n, 0);
    for (int p = 0; p < local; ++p) {
      for (int i = 0; i < n; ++i) {
        const int src = map(p * n + i);
        if (ctx_at[p] < 0 || src < 0 || src >= local || ctx_at[src] < 0) {
          return absl::InvalidArgumentError("dsgd_sgd: the replica map names a device outside the step");
        }
        (*out)[ctx_at[p] * n + i] = ctx_at[src] * n + i;
      }
    }
    return absl::OkStatus();
  }

  // Adds 1 to the counter of every copy (each device's copy of the iterations variable), all
  // checked before any is changed.
  static absl::Status Count(const std::vector<OpKernelContext*>& ctxs, int input) {
    std::vector<core::RefCountPtr<Var>> vars;
    for (OpKernelContext* c : ctxs) {
      Var* v = nullptr;
      TF_RETURN_IF_ERROR(LookupResource<Var, false>(c, HandleFromInput(c, input), &v));
      vars.emplace_back(v);
    }
    std::vector<mutex*> mus;
    for (const auto& v : vars) mus.push_back(v->mu());
    std::sort(mus.begin(), mus.end());
    mus.erase(std::unique(mus.begin(), mus.end()), mus.end());
    for (mutex* mu : mus) mu->lock();
    absl::Status status;
    std::vector<Tensor*> ts;
    for (size_t k = 0; k < vars.size() && status.ok(); ++k) {
      Tensor* t = nullptr;
      status = Writable(ctxs[k], vars[k].get(), DT_INT64, nullptr, 1, "counter", static_cast<int>(k), &t);
      ts.push_back(t);
    }
    if (status.ok()) {
      for (Tensor* t : ts) t->flat<int64_t>()(0) += 1;
    }
    for (auto it = mus.rbegin(); it != mus.rend(); ++it) (*it)->unlock();
    return status;
  }

  // One SgdStep over the variables of `sets` (set k: the gradients of ctxs[k]), on `ctx`; then
  // the counter, if the node has one.
  static void Run(OpKernelContext* ctx, const std::vector<OpKernelContext*>& ctxs,
                  const std::vector<core::RefCountPtr<VarSet>>& sets) {
    // A TensorFlow op event (name:type) around the update: the executor traces an async kernel's
    // dispatch only, so without it profiles showed none of the step's time (xprof's op stats).
    tsl::profiler::TraceMe trace([&] { return absl::StrCat(ctx->op_kernel().name(), ":", kTraceType); });
    const auto meta = ctx->input(kGraphInputMeta).flat<int64_t>();
    const int n = static_cast<int>(meta(kMetaN));
    const bool use_m = meta(kMetaUseMomentum) != 0, nesterov = meta(kMetaNesterov) != 0;
    const bool use_ema = meta(kMetaUseEma) != 0;
    const DataType t = static_cast<DataType>(meta(kMetaDtype)), tm = static_cast<DataType>(meta(kMetaMomentumDtype));
    const Tensor& overwrite_t = ctx->input(kGraphInputOverwrite);
    const bool overwrite = overwrite_t.NumElements() == 1 && overwrite_t.flat<bool>()(0);
    std::vector<int32_t> sources;
    OP_REQUIRES_OK(ctx, Sources(ctxs, n, &sources));
    bool known = false;
#define DSGD_GRAPH_CASE(TT, TM)                                                                            \
  if (!known && t == DataTypeToEnum<TT>::value && tm == DataTypeToEnum<TM>::value) {                       \
    known = true;                                                                                          \
    Grads<TT> grads;                                                                                       \
    for (OpKernelContext* c : ctxs) OP_REQUIRES_OK(ctx, grads.Read(c, false, kGraphInputGrads, n));        \
    SgdStep<TT, TM>(ctx, grads, sets, ctx->input(kGraphInputLr), ctx->input(kGraphInputScales),            \
                    ctx->input(kGraphInputDecay), ctx->input(kGraphInputHyper), use_m, nesterov, use_ema,  \
                    overwrite, sources.empty() ? nullptr : sources.data());                                \
  }
    DSGD_SGD_DTYPES(DSGD_GRAPH_CASE)
#undef DSGD_GRAPH_CASE
    OP_REQUIRES(ctx, known, absl::InvalidArgumentError(absl::StrCat("dsgd_sgd: unsupported dtypes ",
                                                                    DataTypeString(t), " / ", DataTypeString(tm))));
    if (!ctx->status().ok() || meta(kMetaCounter) == 0) return;
    OP_REQUIRES_OK(ctx, Count(ctxs, CounterInput(meta)));
  }
};

REGISTER_KERNEL_BUILDER(Name("Assert").Device(DEVICE_CPU).Label("dsgd_sgd"), GraphSgdOp);

class PackVarsOp : public OpKernel {
 public:
  explicit PackVarsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &n_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("NM", &nm_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("NA", &na_));
    OP_REQUIRES(ctx, (nm_ == 0 || nm_ == n_) && (na_ == 0 || na_ == n_),
                absl::InvalidArgumentError(absl::StrCat("accums and averages must have 0 or ", n_,
                                                        " handles, got ", nm_, " and ", na_)));
  }

  void Compute(OpKernelContext* ctx) override {
    const int total = n_ + nm_ + na_;
    std::vector<core::RefCountPtr<Var>> vars;
    vars.reserve(total);
    for (int i = 0; i < total; ++i) {
      const Tensor& h = ctx->input(i);
      OP_REQUIRES(ctx, h.NumElements() == 1, absl::InvalidArgumentError("each handle must be a scalar"));
      Var* v = nullptr;
      OP_REQUIRES_OK(ctx, LookupResource<Var, false>(ctx, h.flat<ResourceHandle>()(0), &v));
      vars.emplace_back(v);
    }
    auto* set = new VarSet(std::move(vars), n_, nm_, na_);
    const absl::Status s = set->Init();
    if (!s.ok()) {
      set->Unref();
      ctx->SetStatus(s);
      return;
    }
    Tensor* out = nullptr;
    AllocatorAttributes attr;
    attr.set_on_host(true);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out, attr));
    out->scalar<ResourceHandle>()() =
        ResourceHandle::MakeRefCountingHandle<VarSet>(set, ctx->device()->attributes().name());
  }

 private:
  int n_, nm_, na_;
};

class VarSetAddressOp : public OpKernel {
 public:
  explicit VarSetAddressOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    VarSet* set = nullptr;
    OP_REQUIRES_OK(ctx, LookupResource<VarSet, false>(ctx, HandleFromInput(ctx, 0), &set));
    core::RefCountPtr<VarSet> hold(set);  // the caller's handle keeps it alive after this
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = static_cast<int64_t>(reinterpret_cast<intptr_t>(set));
  }
};

template <typename T>
class MultiSumSqOp : public OpKernel {
 public:
  explicit MultiSumSqOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    by_address_ = ctx->def().op() == "DsgdMultiSumSqAt";
    OP_REQUIRES_OK(ctx, ctx->GetAttr("size", &size_));
  }

  void Compute(OpKernelContext* ctx) override {
    Grads<T> grads;
    OP_REQUIRES_OK(ctx, grads.Read(ctx, by_address_, 0, by_address_ ? 0 : num_inputs() - 1));
    const int n = grads.n();
    const Tensor& index_t = ctx->input(grads.next_input);
    OP_REQUIRES(ctx, index_t.NumElements() == n,
                absl::InvalidArgumentError(absl::StrCat("index must have ", n, " elements, got ", index_t.NumElements())));
    const auto index = index_t.flat<int32_t>();
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, index(i) >= 0 && index(i) < size_,
                  absl::InvalidArgumentError(absl::StrCat("index[", i, "] = ", index(i), " is not in [0, ", size_, ")")));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({size_}), &out));
    // Fixed blocks (never across tensors): block k of tensor i is unit first[i] + k.
    std::vector<int64_t> first(n + 1, 0);
    for (int i = 0; i < n; ++i) {
      first[i + 1] = first[i] + (grads.count[i] + kBlock - 1) / kBlock;
    }
    const int64_t units = first[n];
    std::vector<double> partial(units, 0.0);
    auto run = [&](int64_t begin, int64_t end) {
      int i = static_cast<int>(std::upper_bound(first.begin(), first.end(), begin) - first.begin()) - 1;
      for (int64_t u = begin; u < end; ++u) {
        while (u >= first[i + 1]) ++i;
        const T* g = grads.data[i];
        const int64_t size = grads.count[i];
        const int64_t b = (u - first[i]) * kBlock, e = std::min(size, b + kBlock);
        // float accumulation in 8 lanes per 2048 elements (vectorizes), then double
        double acc = 0.0;
        for (int64_t c = b; c < e; c += 2048) {
          const int64_t ce = std::min(e, c + 2048);
          typename Compute<T>::type lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t j = c;
          for (; j + 16 <= ce; j += 16) {  // the same sums, 16 elements per round, prefetched
            __builtin_prefetch(g + j + kAheadBytes / sizeof(T));
            if (sizeof(T) > 4) __builtin_prefetch(g + j + 8 + kAheadBytes / sizeof(T));
            for (int l = 0; l < 8; ++l) {
              const auto x = static_cast<typename Compute<T>::type>(g[j + l]);
              lane[l] += x * x;
            }
            for (int l = 0; l < 8; ++l) {
              const auto x = static_cast<typename Compute<T>::type>(g[j + 8 + l]);
              lane[l] += x * x;
            }
          }
          for (; j + 8 <= ce; j += 8) {
            for (int l = 0; l < 8; ++l) {
              const auto x = static_cast<typename Compute<T>::type>(g[j + l]);
              lane[l] += x * x;
            }
          }
          for (; j < ce; ++j) {
            const auto x = static_cast<typename Compute<T>::type>(g[j]);
            lane[0] += x * x;
          }
          for (int l = 0; l < 8; ++l) acc += static_cast<double>(lane[l]);
        }
        partial[u] = acc;
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    if (workers == nullptr || units < 4) {
      run(0, units);
    } else {
      workers->ParallelFor(units, tsl::thread::ThreadPool::SchedulingParams::Adaptive(kBlock * 2 * sizeof(T)), run);
    }
    std::vector<double> sums(size_, 0.0);
    for (int i = 0; i < n; ++i) {
      for (int64_t u = first[i]; u < first[i + 1]; ++u) sums[index(i)] += partial[u];
    }
    auto o = out->flat<float>();
    for (int j = 0; j < size_; ++j) o(j) = static_cast<float>(sums[j]);
  }

 private:
  bool by_address_;
  int size_;
};

#define DSGD_REGISTER_SGD(T, TM)                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                         \
      Name("DsgdMultiSgd").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<TM>("Tmomentum") \
          .HostMemory("lr").HostMemory("scales").HostMemory("decay").HostMemory("hyper"),          \
      MultiSgdOp<T, TM>);                                                                          \
  REGISTER_KERNEL_BUILDER(                                                                         \
      Name("DsgdMultiSgdAll").Device(DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<TM>("Tmomentum") \
          .HostMemory("varsets").HostMemory("grads").HostMemory("lr").HostMemory("scales")          \
          .HostMemory("decay").HostMemory("hyper").HostMemory("sources"),                         \
      MultiSgdOp<T, TM>);

DSGD_SGD_DTYPES(DSGD_REGISTER_SGD)
#undef DSGD_REGISTER_SGD

// One op for the global-norm coefficient instead of five (reduce_sum, sqrt, reciprocal,
// minimum, multiply: ~60 us each eagerly); the float32 steps are those of rules.global_clip_scale.
class GlobalClipScaleOp : public OpKernel {
 public:
  explicit GlobalClipScaleOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("clipnorm", &clipnorm_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("inv_clipnorm", &inv_clipnorm_));
  }

  void Compute(OpKernelContext* ctx) override {
    const auto sumsq = ctx->input(0).flat<float>();
    double total = 0.0;
    for (int64_t i = 0; i < sumsq.size(); ++i) total += static_cast<double>(sumsq(i));
    const float inv_norm = 1.0f / std::sqrt(static_cast<float>(total));
    const float m = std::isnan(inv_norm) ? inv_norm : std::min(inv_norm, inv_clipnorm_);  // NaN stays NaN
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<float>()() = clipnorm_ * m;
  }

 private:
  float clipnorm_, inv_clipnorm_;
};

// The step counter's copies on every local device in one op (eight AssignAddVariableOps cost
// ~0.3 ms eagerly).
class IncrementAllOp : public OpKernel {
 public:
  explicit IncrementAllOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::vector<core::RefCountPtr<VarSet>> sets;
    OP_REQUIRES_OK(ctx, SetsByAddress(ctx->input(0), &sets));
    LockAll locked(sets);
    std::vector<Tensor*> ts;  // all checked before any is changed
    for (const auto& set : sets) {
      for (int i = 0; i < set->n(); ++i) {
        Tensor* t;
        OP_REQUIRES_OK(ctx, Writable(ctx, set->var(i), DT_INT64, nullptr, 1, "counter", i, &t));
        ts.push_back(t);
      }
    }
    for (Tensor* t : ts) t->flat<int64_t>()(0) += 1;
  }
};

REGISTER_KERNEL_BUILDER(Name("DsgdPackVars").Device(DEVICE_CPU), PackVarsOp);
REGISTER_KERNEL_BUILDER(Name("DsgdVarSetAddress").Device(DEVICE_CPU).HostMemory("address"), VarSetAddressOp);
REGISTER_KERNEL_BUILDER(Name("DsgdIncrementAll").Device(DEVICE_CPU).HostMemory("varsets"), IncrementAllOp);
REGISTER_KERNEL_BUILDER(Name("DsgdGlobalClipScale").Device(DEVICE_CPU).HostMemory("sumsq").HostMemory("scale"),
                        GlobalClipScaleOp);

#define DSGD_REGISTER_SUMSQ(T) \
  REGISTER_KERNEL_BUILDER(Name("DsgdMultiSumSq").Device(DEVICE_CPU).TypeConstraint<T>("T").HostMemory("index"), \
                          MultiSumSqOp<T>);                                                            \
  REGISTER_KERNEL_BUILDER(Name("DsgdMultiSumSqAt").Device(DEVICE_CPU).TypeConstraint<T>("T")                     \
                              .HostMemory("grads").HostMemory("index"),                                         \
                          MultiSumSqOp<T>);

DSGD_REGISTER_SUMSQ(float)
DSGD_REGISTER_SUMSQ(double)
DSGD_REGISTER_SUMSQ(Eigen::bfloat16)
DSGD_REGISTER_SUMSQ(Eigen::half)
#undef DSGD_REGISTER_SUMSQ

// ---------------------------------------------------------------------------------------------
// TEST-ONLY fault injection (tests/test_in_graph.py; docs/in-graph.md).  Nothing here is part of
// the step: each hook reads its environment variable once, when the library loads, and costs one
// compare of a constant when it is unset.
//
//   DSGD_FAULT_JOIN_DELAY_MS=<ms>: each copy of the in-graph node sleeps between registering for
//   cancellation and joining its gathering -- the gap where a cancellation once stranded a copy
//   (before Gatherings kept its marks of cancelled steps), so the test hit that race in most runs.
namespace {
int64_t EnvMilliseconds(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? int64_t{0} : static_cast<int64_t>(std::atoll(v));
}
const int64_t kFaultJoinDelayMs = EnvMilliseconds("DSGD_FAULT_JOIN_DELAY_MS");
}  // namespace

void FaultInjection::BeforeJoin() {
  if (kFaultJoinDelayMs > 0) Env::Default()->SleepForMicroseconds(kFaultJoinDelayMs * 1000);
}

}  // namespace dsgd_kernels
}  // namespace tensorflow

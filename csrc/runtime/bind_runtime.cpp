// Python bindings of the runtime's block plans: sparsepress._native.{Norm, Projection, Stack, KVCache,
// CausalLM}. Objects built once per model (sparsepress.runtime builds them from the model's modules);
// each keeps the arrays and handles it points into alive.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <string>
#include <vector>

#include "elastic.h"
#include "native_experts.h"
#include "native_linear.h"
#include "runtime/decoder.h"
#include "runtime/moe.h"
#include "runtime/stack.h"

namespace nb = nanobind;

namespace sp {
namespace runtime {

namespace {

using py::NativeExperts;
using py::NativeLinear;
using py::require;
using F32Vec = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F32Mat = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Table = nb::ndarray<nb::ro, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Ids = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using IdsOut = nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Logits = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

struct PyNorm {
  Norm norm;
  F32Vec weight;
  std::optional<F32Vec> bias;
  int64_t width;
  PyNorm(F32Vec w, std::optional<F32Vec> b, float eps, bool rms) : weight(w), bias(b), width(int64_t(w.shape(0))) {
    require(!b || b->shape(0) == w.shape(0), "norm bias and weight must have one length");
    norm.weight = w.data();
    norm.bias = b ? b->data() : nullptr;
    norm.eps = eps;
    norm.rms = rms;
  }
};

struct PyProjection {
  Projection proj;
  nb::object linear;
  std::optional<F32Vec> bias;
  std::vector<F32Vec> level_biases;
  int64_t in, out;
  int levels = 0;  // elastic: its level count (0: one weight)
  PyProjection(nb::object handle, std::optional<F32Vec> b, int slot, std::vector<F32Vec> per_level)
      : linear(handle), bias(b), level_biases(std::move(per_level)) {
    require(slot >= -1, "a projection's threshold slot is -1 (none) or an index");
    if (nb::isinstance<ElasticLinear>(handle)) {
      ElasticLinear& e = nb::cast<ElasticLinear&>(handle);
      in = e.in_features(), out = e.out_features(), levels = e.levels();
      // (the thresholded kernels read one weight's columns; an elastic level is several)
      require(slot == -1, "activation-sparsity thresholds on elastic layers have no native kernel");
      require(level_biases.empty() || int(level_biases.size()) == levels, "one bias per level, or none");
      for (const F32Vec& lb : level_biases) {
        require(int64_t(lb.shape(0)) == out, "level biases must have out_features elements");
        proj.level_bias.push_back(lb.data());
      }
      proj.elastic = &e;
    } else {
      NativeLinear& l = nb::cast<NativeLinear&>(handle);
      in = l.in_features(), out = l.out_features();
      require(level_biases.empty(), "level biases are for elastic layers only");
      proj.linear = &l;
    }
    require(!b || int64_t(b->shape(0)) == out, "projection bias must have out_features elements");
    proj.bias = b ? b->data() : nullptr;
    proj.slot = slot;
  }
};

// A mixture-of-experts block: the layer's NativeExperts, its router and an optional shared expert.
class PyMoe {
 public:
  PyMoe(nb::object experts, PyProjection& router, int64_t top_k, bool normalize, PyProjection* shared_gate,
        PyProjection* shared_up, PyProjection* shared_down, PyProjection* shared_scale) {
    NativeExperts& e = nb::cast<NativeExperts&>(experts);
    hidden = e.hidden();
    const int64_t n = e.num_experts();
    require(!router.levels && router.in == hidden && router.out == n,
            "the router must be one [" + std::to_string(n) + ", " + std::to_string(hidden) + "] weight");
    require(top_k >= 1 && top_k <= n, "top_k must be in [1, " + std::to_string(n) + "]");
    const bool any = shared_gate || shared_up || shared_down || shared_scale;
    require(!any || (shared_gate && shared_up && shared_down), "a shared expert needs gate, up and down");
    block.experts = &e.experts();
    block.inter = e.inter();
    block.act = e.activation();
    block.router = router.proj;
    block.top_k = top_k;
    block.normalize = normalize;
    block.slot = -1;
    keep_ = {experts, nb::find(router)};
    if (shared_gate) {
      const int64_t inter = shared_gate->out;
      require(shared_gate->in == hidden && shared_up->in == hidden && shared_up->out == inter &&
                  shared_down->in == inter && shared_down->out == hidden,
              "the shared expert must be gate / up [inter, hidden] and down [hidden, inter]");
      require(!shared_scale || (shared_scale->in == hidden && shared_scale->out == 1 && !shared_scale->levels),
              "the shared expert's gate must be one [1, hidden] weight");
      block.shared_gate = shared_gate->proj, block.shared_up = shared_up->proj, block.shared_down = shared_down->proj;
      block.shared_inter = inter;
      for (PyProjection* p : {shared_gate, shared_up, shared_down}) keep_.push_back(nb::find(*p));
      if (shared_scale) {
        block.shared_scale = shared_scale->proj;
        keep_.push_back(nb::find(*shared_scale));
      }
    }
  }

  MoeBlock block;
  int64_t hidden = 0;

 private:
  std::vector<nb::object> keep_;
};

class PyStack {
 public:
  PyStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, bool pre_norm,
          float scale) {
    require(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && intermediate > 0, "sizes must be positive");
    require(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
    Shape s;
    s.hidden = hidden, s.heads = heads, s.kv_heads = kv_heads, s.head_dim = head_dim, s.intermediate = intermediate;
    s.pre_norm = pre_norm, s.scale = scale;
    stack_ = std::make_unique<Stack>(s);
  }

  void add_block(PyNorm& norm1, PyNorm& norm2, PyProjection& q, PyProjection& k, PyProjection& v, PyProjection& o,
                 PyProjection* up, PyProjection* down, PyProjection* gate, PyNorm* q_norm, PyNorm* k_norm,
                 int activation, PyMoe* moe, bool qk_norm_full) {
    const Shape& s = stack_->shape();
    const int64_t hq = s.heads * s.head_dim, hk = s.kv_heads * s.head_dim;
    require(norm1.width == s.hidden && norm2.width == s.hidden, "block norms must have hidden_size weights");
    auto fits = [&](const PyProjection& p, int64_t in, int64_t out, const char* name) {
      require(p.in == in && p.out == out, std::string(name) + " projection is " + std::to_string(p.out) + " x " +
                                              std::to_string(p.in) + ", the block needs " + std::to_string(out) +
                                              " x " + std::to_string(in));
    };
    fits(q, s.hidden, hq, "query");
    fits(k, s.hidden, hk, "key");
    fits(v, s.hidden, hk, "value");
    fits(o, hq, s.hidden, "output");
    require(moe ? !up && !down && !gate : up && down, "a block has up and down projections or a MoE block, not both");
    if (up) fits(*up, s.hidden, s.intermediate, "up");
    if (down) fits(*down, s.intermediate, s.hidden, "down");
    if (gate) fits(*gate, s.hidden, s.intermediate, "gate");
    require(!gate || s.pre_norm, "gated MLPs are supported in pre-norm blocks only");
    if (moe) {
      require(s.pre_norm, "MoE blocks are supported in pre-norm blocks only");
      require(moe->hidden == s.hidden, "the MoE block's experts must take hidden_size inputs");
      require(moe->block.slot < 0, "this MoE block is already in a stack");
    }
    const int64_t qw = qk_norm_full ? hq : s.head_dim, kw = qk_norm_full ? hk : s.head_dim;
    require(!q_norm || q_norm->width == qw, std::string("q_norm must have ") + (qk_norm_full ? "heads * " : "") +
                                                "head_dim weights");
    require(!k_norm || k_norm->width == kw, std::string("k_norm must have ") + (qk_norm_full ? "kv_heads * " : "") +
                                                "head_dim weights");
    Block b;
    b.qk_norm_full = qk_norm_full;
    b.norm1 = norm1.norm, b.norm2 = norm2.norm;
    if (q_norm) b.q_norm = q_norm->norm;
    if (k_norm) b.k_norm = k_norm->norm;
    b.q = q.proj, b.k = k.proj, b.v = v.proj, b.o = o.proj;
    if (up) b.up = up->proj;
    if (down) b.down = down->proj;
    if (gate) b.gate = gate->proj;
    b.act = py::to_activation(activation);
    for (const Projection* p : {&b.q, &b.k, &b.v, &b.o, &b.up, &b.down, &b.gate}) slots_ = std::max(slots_, p->slot + 1);
    if (moe) {
      const MoeBlock& m = moe->block;
      for (const Projection* p : {&m.shared_gate, &m.shared_up, &m.shared_down}) slots_ = std::max(slots_, p->slot + 1);
    }
    for (const PyProjection* p : std::initializer_list<const PyProjection*>{&q, &k, &v, &o, up, down, gate}) {
      if (!p || !p->levels) continue;
      require(elastic_levels_ == 0 || elastic_levels_ == p->levels, "elastic projections of one stack must store "
                                                                    "the same number of levels");
      elastic_levels_ = p->levels;
    }
    levels_ = std::max(1, elastic_levels_);
    if (moe) {
      moe->block.slot = int(moes_.size());
      moes_.push_back(&moe->block);
      b.moe = &moe->block;
      keep_.push_back(nb::find(*moe));
    }
    stack_->add_block(b);
    for (nb::handle h : {nb::find(norm1), nb::find(norm2), nb::find(q), nb::find(k), nb::find(v), nb::find(o)})
      keep_.push_back(nb::borrow(h));
    if (up) keep_.push_back(nb::find(*up));
    if (down) keep_.push_back(nb::find(*down));
    if (gate) keep_.push_back(nb::find(*gate));
    if (q_norm) keep_.push_back(nb::find(*q_norm));
    if (k_norm) keep_.push_back(nb::find(*k_norm));
  }

  void set_final_norm(PyNorm& n) {
    require(n.width == stack_->shape().hidden, "the final norm must have hidden_size weights");
    stack_->set_final_norm(n.norm);
    keep_.push_back(nb::find(n));
  }

  // Unchecked: x, out float32 [batch * seq, hidden]; mask float32 with strides [b, h, s] in floats (0:
  // none); cos, sin float32 [batch * seq, head_dim] (0: no rotary embedding).
  void forward_raw(uintptr_t x, uintptr_t out, int64_t batch, int64_t seq, uintptr_t mask,
                   const std::vector<int64_t>& mask_strides, bool causal, uintptr_t cos, uintptr_t sin,
                   bool final_norm, int threads, uintptr_t thresholds, int level, uintptr_t top_p) {
    require(batch >= 0 && seq >= 0 && x && out, "forward_raw: bad sizes or null pointers");
    require(level >= 0 && level < levels_, "forward_raw: level " + std::to_string(level) + " out of range for " +
                                               std::to_string(levels_) + " levels");
    require(mask_strides.size() == 3, "forward_raw: three mask strides");
    require((cos == 0) == (sin == 0), "forward_raw: cos and sin go together");
    MaskView m{reinterpret_cast<const float*>(mask), mask_strides[0], mask_strides[1], mask_strides[2]};
    nb::gil_scoped_release unlocked;
    stack_->forward(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), batch, seq, m, causal,
                    reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin), nullptr, final_norm,
                    threads, reinterpret_cast<const float*>(thresholds), level, reinterpret_cast<const float*>(top_p));
  }

  // Unchecked as forward_raw, with the cache: the tokens are its next `seq` positions.
  void forward_cached_raw(uintptr_t x, uintptr_t out, int64_t seq, uintptr_t cos, uintptr_t sin, KVCache& cache,
                          bool final_norm, int threads, uintptr_t thresholds, uintptr_t top_p) {
    require(cache.layers == stack_->layers(), "the cache was made for another stack");
    require(cache.length + seq <= cache.capacity, "the cache is full (" + std::to_string(cache.capacity) +
                                                      " positions)");
    nb::gil_scoped_release unlocked;
    stack_->forward(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), cache.batch, seq, MaskView{},
                    false, reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin), &cache,
                    final_norm, threads, reinterpret_cast<const float*>(thresholds), 0,
                    reinterpret_cast<const float*>(top_p));
  }

  Stack& stack() { return *stack_; }
  // How many thresholds a call must give (the highest projection slot + 1).
  int slots() const { return slots_; }
  int elastic_levels() const { return elastic_levels_; }
  // How many top_p values a call gives (one per MoE block).
  int moe_blocks() const { return int(moes_.size()); }
  // Each MoE block's (tokens, evaluations, bytes read) since the last read; reading zeroes them.
  std::vector<std::vector<int64_t>> take_moe_counts() {
    std::vector<std::vector<int64_t>> out;
    for (const MoeBlock* m : moes_)
      out.push_back({m->counts.tokens.exchange(0), m->counts.evaluations.exchange(0), m->counts.bytes.exchange(0)});
    return out;
  }

 private:
  std::unique_ptr<Stack> stack_;
  std::vector<const MoeBlock*> moes_;
  int slots_ = 0;
  int elastic_levels_ = 0;  // levels of the elastic projections (0: none)
  int levels_ = 1;          // level indices a call may name
  std::vector<nb::object> keep_;
};

class PyCausalLM {
 public:
  PyCausalLM(nb::object stack, Table table, std::optional<F32Vec> scales, int bits, PyProjection& head, F32Mat cos,
             F32Mat sin)
      : stack_obj_(stack), table_(table), scales_(scales), cos_(cos), sin_(sin) {
    PyStack& s = nb::cast<PyStack&>(stack);
    const Shape& sh = s.stack().shape();
    // elastic stacks: every step runs the level it is given (the head may be elastic with the same levels)
    require(head.levels == 0 || head.levels == s.elastic_levels(), "an elastic head must store the blocks' levels");
    levels_ = std::max(1, s.elastic_levels());
    require(bits == 32 || bits == 8 || bits == 4, "embedding bits must be 32, 8 or 4");
    const int64_t vocab = int64_t(table.shape(0)), width = int64_t(table.shape(1));
    const int64_t want = bits == 4 ? (sh.hidden + 1) / 2 : sh.hidden;
    require(width == want, "the embedding table has " + std::to_string(width) + " columns, expected " +
                               std::to_string(want));
    const bool dtype_ok = bits == 32 ? table.dtype() == nb::dtype<float>()
                                     : bits == 8 ? table.dtype() == nb::dtype<int8_t>() : table.dtype() == nb::dtype<uint8_t>();
    require(dtype_ok, "embedding table dtype does not match its bits");
    require(bits == 32 || (scales && int64_t(scales->shape(0)) == vocab), "quantized embeddings need [vocab] scales");
    require(head.in == sh.hidden, "the head must take hidden_size inputs");
    require(cos.shape(1) == size_t(sh.head_dim) && sin.shape(1) == size_t(sh.head_dim) &&
                cos.shape(0) == sin.shape(0) && cos.shape(0) > 0,
            "rotary tables must be [positions, head_dim]");
    Embedding e;
    e.table = table.data(), e.scales = scales ? scales->data() : nullptr, e.bits = bits, e.vocab = vocab, e.dim = sh.hidden;
    head_obj_ = nb::find(head);
    slots_ = std::max(s.slots(), head.proj.slot + 1);
    moe_blocks_ = s.moe_blocks();
    vocab_ = vocab;
    lm_ = std::make_unique<CausalLM>(&s.stack(), e, head.proj, cos.data(), sin.data(), int64_t(cos.shape(0)));
  }

  // ids int64 [batch, seq] as the cache's next positions; next int64 [batch] gets each row's argmax;
  // logits float32 [batch, vocab] (optional) the last token's logits.
  void step(Ids ids, KVCache& cache, IdsOut next, std::optional<Logits> logits, int threads,
            std::optional<F32Vec> thresholds, int level,
            std::optional<F32Vec> top_p) {
    require(level >= 0 && level < levels_, "step: level " + std::to_string(level) + " out of range for " +
                                               std::to_string(levels_) + " levels");
    const int64_t batch = int64_t(ids.shape(0)), seq = int64_t(ids.shape(1));
    require(batch == cache.batch, "ids have " + std::to_string(batch) + " rows, the cache " + std::to_string(cache.batch));
    require(cache.layers == lm_->stack().layers(), "the cache was made for another model");
    require(int64_t(next.shape(0)) == batch, "next must have one entry per row");
    require(!logits || (int64_t(logits->shape(0)) == batch && int64_t(logits->shape(1)) == lm_->vocab()),
            "logits must be [batch, vocab]");
    require(cache.length + seq <= cache.capacity, "the cache is full (" + std::to_string(cache.capacity) + " positions)");
    require(cache.length + seq <= lm_->positions(), "past the rotary table's " + std::to_string(lm_->positions()) +
                                                        " positions");
    const int64_t* p = ids.data();
    for (int64_t i = 0; i < batch * seq; ++i)
      require(p[i] >= 0 && p[i] < vocab_, "token id " + std::to_string(p[i]) + " outside the vocabulary");
    float* out = logits ? logits->data() : nullptr;
    require(!thresholds || int64_t(thresholds->shape(0)) >= slots_, "thresholds must cover every projection's slot");
    const float* t = thresholds ? thresholds->data() : nullptr;
    require(!top_p || int64_t(top_p->shape(0)) >= moe_blocks_, "top_p must have one value per MoE block");
    const float* tp = top_p ? top_p->data() : nullptr;
    nb::gil_scoped_release unlocked;
    lm_->step(p, batch, seq, cache, out, next.data(), threads, t, level, tp);
  }

  int64_t vocab() const { return lm_->vocab(); }

 private:
  nb::object stack_obj_, head_obj_;
  Table table_;
  std::optional<F32Vec> scales_;
  F32Mat cos_, sin_;
  int64_t vocab_ = 0;
  int slots_ = 0;
  int moe_blocks_ = 0;
  int levels_ = 1;  // elastic level count of the stack (1: one weight per projection)
  std::unique_ptr<CausalLM> lm_;
};

nb::ndarray<nb::pytorch, float> cache_view(nb::handle self, KVCache& c, int64_t layer, bool keys) {
  require(layer >= 0 && layer < c.layers, "layer out of range");
  size_t shape[4] = {size_t(c.batch), size_t(c.kv_heads), size_t(c.capacity), size_t(c.head_dim)};
  float* data = keys ? c.keys(layer) : c.values(layer);
  return nb::ndarray<nb::pytorch, float>(data, 4, shape, self);
}

using I64Mat = nb::ndarray<int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using F32MatOut = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// The MoE blocks' routing alone (tests compare it with the routers' torch code).
void moe_route(F32Mat logits, int64_t top_k, bool normalize, float top_p, I64Mat index, F32MatOut weight) {
  const int64_t T = int64_t(logits.shape(0)), E = int64_t(logits.shape(1));
  require(top_k >= 1 && top_k <= E, "top_k must be in [1, n_experts]");
  require(int64_t(index.shape(0)) == T && int64_t(index.shape(1)) == top_k && int64_t(weight.shape(0)) == T &&
              int64_t(weight.shape(1)) == top_k,
          "index and weight must be [tokens, top_k]");
  route(logits.data(), T, E, top_k, normalize, top_p, index.data(), weight.data());
}

}  // namespace

void bind(nb::module_& m) {
  m.def("moe_route", &moe_route, nb::arg("logits"), nb::arg("top_k"), nb::arg("normalize"), nb::arg("top_p"),
        nb::arg("index"), nb::arg("weight"),
        "A MoE block's routing of logits [tokens, n_experts]: softmax, top-k (renormalised when `normalize`),\n"
        "adaptive top_p (< 1) dropping slots to index n_experts; written to index / weight [tokens, top_k].");
  nb::class_<PyNorm>(m, "Norm", "A LayerNorm (rms=False) or RMSNorm's weights for a native Stack.")
      .def(nb::init<F32Vec, std::optional<F32Vec>, float, bool>(), nb::arg("weight"), nb::arg("bias").none(),
           nb::arg("eps"), nb::arg("rms"));
  nb::class_<PyProjection>(m, "Projection", "A NativeLinear (and bias) as one of a block's projections.")
      .def(nb::init<nb::object, std::optional<F32Vec>, int, std::vector<F32Vec>>(), nb::arg("linear"),
           nb::arg("bias").none(), nb::arg("slot") = -1, nb::arg("level_biases") = std::vector<F32Vec>(),
           "linear: a NativeLinear or an ElasticLinear (whose level each Stack call names). slot >= 0: the\n"
           "index of this projection's activation-sparsity threshold in a call's thresholds. level_biases: an\n"
           "elastic projection's bias at each level (none: `bias` at every level).");
  nb::class_<PyMoe>(m, "MoeBlock", "A mixture-of-experts block of a Stack (csrc/runtime/moe.h).")
      .def(nb::init<nb::object, PyProjection&, int64_t, bool, PyProjection*, PyProjection*, PyProjection*,
                    PyProjection*>(),
           nb::arg("experts"), nb::arg("router"), nb::arg("top_k"), nb::arg("normalize"),
           nb::arg("shared_gate").none() = nb::none(), nb::arg("shared_up").none() = nb::none(),
           nb::arg("shared_down").none() = nb::none(), nb::arg("shared_scale").none() = nb::none(),
           "experts: the layer's NativeExperts; router: its [n_experts, hidden] weight as a Projection; top_k\n"
           "experts per token, their softmax weights renormalised when `normalize`; shared_*: a shared expert\n"
           "down(act(gate(h)) * up(h)) added to every token, scaled by sigmoid(shared_scale(h)) when given.");
  nb::class_<PyStack>(m, "Stack", "Transformer blocks run natively, one call for all of them (csrc/runtime/stack.h).")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, float>(), nb::arg("hidden"), nb::arg("heads"),
           nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("intermediate"), nb::arg("pre_norm"), nb::arg("scale"))
      .def("add_block", &PyStack::add_block, nb::arg("norm1"), nb::arg("norm2"), nb::arg("q"), nb::arg("k"),
           nb::arg("v"), nb::arg("o"), nb::arg("up").none() = nb::none(), nb::arg("down").none() = nb::none(),
           nb::arg("gate").none() = nb::none(), nb::arg("q_norm").none() = nb::none(),
           nb::arg("k_norm").none() = nb::none(), nb::arg("activation") = 0, nb::arg("moe").none() = nb::none(),
           nb::arg("qk_norm_full") = false,
           "moe: a MoeBlock in place of up / down / gate; qk_norm_full: q_norm / k_norm span the whole\n"
           "projection (OLMoE) instead of each head.")
      .def("set_final_norm", &PyStack::set_final_norm, nb::arg("norm"))
      .def_prop_ro("layers", [](PyStack& s) { return s.stack().layers(); })
      .def_prop_ro("slots", &PyStack::slots, "How many activation-sparsity thresholds a call gives.")
      .def_prop_ro("elastic_levels", &PyStack::elastic_levels, "Levels of its elastic projections (0: none).")
      .def_prop_ro("moe_blocks", &PyStack::moe_blocks, "How many MoE blocks it has (top_p values a call gives).")
      .def("take_moe_counts", &PyStack::take_moe_counts,
           "Each MoE block's [tokens, evaluations, bytes read] since the last call (zeroed by reading).")
      .def("forward_raw", &PyStack::forward_raw, nb::arg("x_ptr"), nb::arg("out_ptr"), nb::arg("batch"), nb::arg("seq"),
           nb::arg("mask_ptr"), nb::arg("mask_strides"), nb::arg("causal"), nb::arg("cos_ptr"), nb::arg("sin_ptr"),
           nb::arg("final_norm"), nb::arg("n_threads") = 1, nb::arg("thresholds_ptr") = 0, nb::arg("level") = 0,
           nb::arg("top_p_ptr") = 0,
           "Unchecked: out[T, hidden] = blocks(x[T, hidden]) for T = batch * seq tokens; thresholds_ptr: float32\n"
           "activation-sparsity thresholds indexed by the projections' slots (0: none); level: the elastic\n"
           "level index every elastic projection runs in this call; top_p_ptr: float32 adaptive-routing top_p\n"
           "of each MoE block (0: plain top-k).")
      .def("forward_cached_raw", &PyStack::forward_cached_raw, nb::arg("x_ptr"), nb::arg("out_ptr"), nb::arg("seq"),
           nb::arg("cos_ptr"), nb::arg("sin_ptr"), nb::arg("cache"), nb::arg("final_norm"), nb::arg("n_threads") = 1,
           nb::arg("thresholds_ptr") = 0, nb::arg("top_p_ptr") = 0,
           "Unchecked pointers: the next `seq` positions of every row of `cache`.");
  nb::class_<KVCache>(m, "KVCache", "Keys and values of every layer of a Stack for a batch of sequences.")
      .def("__init__",
           [](KVCache* self, PyStack& s, int64_t batch, int64_t capacity) {
             require(batch > 0 && capacity > 0, "batch and capacity must be positive");
             const Shape& sh = s.stack().shape();
             new (self) KVCache(s.stack().layers(), batch, sh.kv_heads, capacity, sh.head_dim);
           },
           nb::arg("stack"), nb::arg("batch"), nb::arg("capacity"))
      .def_ro("batch", &KVCache::batch)
      .def_ro("capacity", &KVCache::capacity)
      .def_ro("layers", &KVCache::layers)
      .def_prop_ro("length", [](KVCache& c) { return c.length; }, "Positions filled so far.")
      .def("set_padding", [](KVCache& c, int64_t b, int64_t pads) {
             require(b >= 0 && b < c.batch && pads >= 0 && pads <= c.capacity, "bad row or padding");
             require(c.length == 0, "padding is set before the prompt runs");
             c.set_padding(b, pads);
           }, nb::arg("row"), nb::arg("pads"), "Row `row`'s first `pads` positions are left padding.")
      .def("keys", [](nb::handle self, int64_t layer) { return cache_view(self, nb::cast<KVCache&>(self), layer, true); },
           nb::arg("layer"), "Layer `layer`'s keys as a torch view [batch, kv_heads, capacity, head_dim].")
      .def("values", [](nb::handle self, int64_t layer) { return cache_view(self, nb::cast<KVCache&>(self), layer, false); },
           nb::arg("layer"), "Layer `layer`'s values as a torch view [batch, kv_heads, capacity, head_dim].");
  nb::class_<PyCausalLM>(m, "CausalLM", "Embedding + Stack + final norm + LM head: one native call per decode step.")
      .def(nb::init<nb::object, Table, std::optional<F32Vec>, int, PyProjection&, F32Mat, F32Mat>(), nb::arg("stack"),
           nb::arg("table"), nb::arg("scales").none(), nb::arg("bits"), nb::arg("head"), nb::arg("cos"), nb::arg("sin"))
      .def("step", &PyCausalLM::step, nb::arg("ids"), nb::arg("cache"), nb::arg("next"),
           nb::arg("logits").none() = nb::none(), nb::arg("n_threads") = 1, nb::arg("thresholds").none() = nb::none(),
           nb::arg("level") = 0, nb::arg("top_p").none() = nb::none(),
           "Runs ids [batch, seq] as the cache's next positions; next[b] = argmax of row b's last logits;\n"
           "thresholds: float32 activation-sparsity thresholds indexed by the projections' slots; level: the\n"
           "elastic level index every elastic projection runs (0: the lowest sparsity); top_p: float32 adaptive-routing\n"
           "top_p of each MoE block (none: plain top-k).")
      .def_prop_ro("vocab", &PyCausalLM::vocab);
}

}  // namespace runtime
}  // namespace sp

// train/pipeline.cpp: the pipeline executor (see pipeline.h for the contract).
//
// Glossary: pp pipeline ranks, VS chunks per rank, M micro-batches, B, T, N = B*T, C d_model,
// V vocab, g virtual stage (layer group) = chunk * pp + rank.
#include "train/pipeline.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <utility>

#include "core/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/grad_norm.h"

namespace loom::train {

using parallel::Action;
using parallel::ActionKind;

namespace {

// MPI guarantees tags up to 32767 on every implementation.
constexpr int kMaxTag = 32767;
enum class Stream : int { activation = 0, grad = 1 };

// Tag of the message that virtual stage `sender` sends for micro-batch `mb`: unique per
// (mb, sender, kind), so mismatched pairings cannot silently match.
int p2p_tag(Stream s, int mb, int sender, int n_virtual) {
  return (mb * n_virtual + sender) * 2 + int(s);
}

using Key = std::pair<int, int>;  // (micro-batch, chunk)

Tensor take(std::map<Key, Tensor>& m, Key k, const char* what) {
  auto it = m.find(k);
  LOOM_ASSERT(it != m.end(), "pipeline: no {} for micro-batch {} chunk {} (schedule bug)", what,
              k.first, k.second);
  Tensor t = std::move(it->second);
  m.erase(it);
  return t;
}

}  // namespace

// AdamW over one chunk's own flat buffer. optim::AdamW walks a model::ParamLayout, which can
// only describe the whole model; this applies the same kernel with the same per-tensor decay
// rule and learning-rate schedule to the chunk's tensors, so updates are bit-identical to the
// serial optimizer's on the same gradients. ZeRO-1 (dp size D > 1): this dp rank keeps m and v
// for, and updates, only its equal share [lo, hi) of the chunk's flat buffer; the shares are
// then broadcast over dp.
struct PipelineExecutor::ChunkOptimizer {
  ChunkOptimizer(const model::GptStage& stage, const optim::AdamWConfig& cfg, MemoryPool& pool,
                 int dp_rank, int dp_size)
      : stage(stage), cfg(cfg) {
    const int64_t n = stage.total(), share = (n + dp_size - 1) / dp_size;
    lo = std::min(n, share * dp_rank);
    hi = std::min(n, lo + share);
    m = Tensor::zeros({hi - lo}, DType::f32, pool, MemCategory::optimizer);
    v = Tensor::zeros({hi - lo}, DType::f32, pool, MemCategory::optimizer);
  }
  // f(local offset, count, offset into m/v, param) for each tensor's part inside [lo, hi).
  template <class F>
  void for_each_owned(F&& f) const {
    for (const model::StageParam& p : stage.params()) {
      const int64_t b = std::max(lo, p.local_offset), e = std::min(hi, p.local_offset + p.global.numel);
      if (b < e) f(b, e - b, b - lo, p);
    }
  }
  void step(int64_t step_index, float grad_scale) {
    const float lr = optim::lr_at(cfg, step_index);
    for_each_owned([&](int64_t o, int64_t len, int64_t mo, const model::StageParam& p) {
      kernels::adamw_step(stage.weights() + o, stage.grads() + o, m.data<float>() + mo,
                          v.data<float>() + mo, len, lr, cfg.beta1, cfg.beta2, cfg.eps,
                          p.global.weight_decay ? cfg.weight_decay : 0.f, step_index, grad_scale);
    });
  }
  // m and v to / from full global-layout buffers (by each tensor's global offset); only this
  // rank's share is written on export (zeros elsewhere stay for a sum over dp).
  void export_state(float* global_m, float* global_v) const {
    for_each_owned([&](int64_t o, int64_t len, int64_t mo, const model::StageParam& p) {
      if (p.tied_copy) return;
      const int64_t g = p.global.offset + (o - p.local_offset);
      std::memcpy(global_m + g, m.data<float>() + mo, size_t(len) * sizeof(float));
      std::memcpy(global_v + g, v.data<float>() + mo, size_t(len) * sizeof(float));
    });
  }
  void import_state(const float* global_m, const float* global_v) {
    for_each_owned([&](int64_t o, int64_t len, int64_t mo, const model::StageParam& p) {
      const int64_t g = p.global.offset + (o - p.local_offset);
      std::memcpy(m.data<float>() + mo, global_m + g, size_t(len) * sizeof(float));
      std::memcpy(v.data<float>() + mo, global_v + g, size_t(len) * sizeof(float));
    });
  }
  const model::GptStage& stage;
  optim::AdamWConfig cfg;
  int64_t lo = 0, hi = 0;  // this dp rank's share of the chunk's flat buffer
  Tensor m, v;             // (hi - lo)
};

PipelineExecutor::PipelineExecutor(const model::ModelConfig& cfg, const PipelineConfig& pc,
                                   const comm::ProcessGroup& pp, MemoryPool& pool,
                                   const comm::ProcessGroup* dp, const comm::ProcessGroup* tp)
    : cfg_(cfg), pc_(pc), pp_(pp), pool_(pool) {
  if (dp && dp->valid() && dp->size() > 1) dp_ = *dp;
  if (tp && tp->valid() && tp->size() > 1) tp_ = *tp;
  LOOM_CHECK(pp.valid(), "PipelineExecutor needs a valid pp group");
  const int n_pp = pp.size(), rank = pp.rank();
  // Validate the schedule first: it names the valid micro-batch counts.
  schedule_ = parallel::make_schedule(pc.schedule, n_pp, pc.micro_batches, pc.virtual_stages);
  const int n_virtual = n_pp * pc.virtual_stages;
  LOOM_CHECK(2 * int64_t(pc.micro_batches) * n_virtual <= kMaxTag + 1,
             "{} micro-batches x {} virtual stages need more MPI tags than the guaranteed {}; "
             "use at most {} micro-batches",
             pc.micro_batches, n_virtual, kMaxTag, (kMaxTag + 1) / (2 * n_virtual));
  std::vector<model::StageSpan> spans = model::split_stages(cfg, n_virtual, pc.stage_layers);
  for (int c = 0; c < pc.virtual_stages; ++c) {
    chunks_.push_back(
        std::make_unique<model::GptStage>(cfg, spans[size_t(c * n_pp + rank)], pool, pc.precision,
                                          tp_.valid() ? &tp_ : nullptr));
    chunks_.back()->set_recompute(pc.recompute);
    const bool zero1 = pc.zero >= 1 && dp_.valid();
    optimizers_.push_back(std::make_unique<ChunkOptimizer>(
        *chunks_.back(), pc.optim, pool, zero1 ? dp_.rank() : 0, zero1 ? dp_.size() : 1));
  }
  // Megatron's embedding group: the first and last pp ranks both hold embed.token.weight.
  if (n_pp > 1) embedding_ = pp.split({{0, n_pp - 1}}, "pp_embedding");
}

PipelineExecutor::~PipelineExecutor() = default;

void PipelineExecutor::init_weights(uint64_t seed) {
  for (auto& c : chunks_) c->init_weights(seed);
}

void PipelineExecutor::export_weights(float* global_weights, bool include_tied_copy) const {
  for (auto& c : chunks_) c->export_weights(global_weights, include_tied_copy);
}

void PipelineExecutor::import_weights(const float* global_weights) {
  for (auto& c : chunks_) c->import_weights(global_weights);
}

void PipelineExecutor::export_optimizer(float* global_m, float* global_v) const {
  for (auto& o : optimizers_) o->export_state(global_m, global_v);
}

void PipelineExecutor::import_optimizer(const float* global_m, const float* global_v,
                                        int64_t step) {
  LOOM_CHECK(step >= 0, "optimizer step count {} must be >= 0", step);
  for (auto& o : optimizers_) o->import_state(global_m, global_v);
  step_ = step;
}

PipelineStepStats PipelineExecutor::train_step(const int32_t* tokens, int64_t B, int64_t T) {
  const int n_pp = pp_.size(), rank = pp_.rank(), VS = pc_.virtual_stages;
  const int M = pc_.micro_batches, n_virtual = n_pp * VS;
  const int n_tp = tp_.valid() ? tp_.size() : 1;
  LOOM_CHECK((B * T) % n_tp == 0, "tensor parallel needs B*T = {} divisible by tp = {}", B * T,
             n_tp);
  const int64_t N = B * T / n_tp, C = cfg_.d_model;  // rows of the messages here
  const int n_dp = dp_.valid() ? dp_.size() : 1;
  const float grad_scale = 1.0f / float(B * T * M * n_dp);
  bool needs_tokens = false;
  for (auto& c : chunks_) needs_tokens |= c->span().has_embedding || c->span().has_head;
  LOOM_CHECK(!needs_tokens || tokens != nullptr,
             "{} holds the embedding or the head and needs the step's tokens (M={}, B={}, T+1={})",
             pp_.prefix(), M, B, T + 1);

  // Split (M, B, T+1) windows into per-micro-batch inputs (B,T) and targets (B,T).
  std::vector<std::vector<int32_t>> inputs(static_cast<size_t>(M)), targets(static_cast<size_t>(M));
  if (needs_tokens)
    for (int mb = 0; mb < M; ++mb) {
      inputs[size_t(mb)].resize(size_t(B * T));
      targets[size_t(mb)].resize(size_t(B * T));
      for (int64_t b = 0; b < B; ++b) {
        const int32_t* row = tokens + (int64_t(mb) * B + b) * (T + 1);
        std::memcpy(&inputs[size_t(mb)][size_t(b * T)], row, size_t(T) * 4);
        std::memcpy(&targets[size_t(mb)][size_t(b * T)], row + 1, size_t(T) * 4);
      }
    }

  for (auto& c : chunks_) c->zero_grads();
  std::map<Key, Tensor> act_in, grad_in, act_out, grad_out;
  std::vector<comm::Work> pending_recvs, sends;
  // Before each compute action: its inputs must have arrived (the schedule's contract), and
  // sends that have completed release their tensors now rather than at the end of the step,
  // so 1F1B's bound on live activations also holds for the (N,C) outputs in flight.
  auto wait_recvs = [&] {
    for (auto& w : pending_recvs) w.wait();
    pending_recvs.clear();
    std::erase_if(sends, [](const comm::Work& w) { return w.test(); });
  };
  double loss_sum = 0;
  int64_t count = 0;

  for (const Action& a : schedule_.stages[size_t(rank)]) {
    const int mb = a.micro_batch, c = a.chunk;
    const int g = schedule_.virtual_stage(rank, c);
    const Key key{mb, c};
    model::GptStage& stage = *chunks_[size_t(c)];
    switch (a.kind) {
      case ActionKind::recv_activation: {
        LOOM_ASSERT(g > 0 && a.peer == (g - 1) % n_pp, "RecvAct at virtual stage {} from {}", g,
                    a.peer);
        Tensor buf = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::comm);  // (N,C)
        pending_recvs.push_back(
            pp_.irecv(buf, a.peer, p2p_tag(Stream::activation, mb, g - 1, n_virtual)));
        act_in[key] = buf;
        break;
      }
      case ActionKind::recv_grad: {
        LOOM_ASSERT(g + 1 < n_virtual && a.peer == (g + 1) % n_pp, "RecvGrad at {} from {}", g,
                    a.peer);
        Tensor buf = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::comm);  // (N,C)
        pending_recvs.push_back(
            pp_.irecv(buf, a.peer, p2p_tag(Stream::grad, mb, g + 1, n_virtual)));
        grad_in[key] = buf;
        break;
      }
      case ActionKind::forward: {
        wait_recvs();
        Tensor x = g > 0 ? take(act_in, key, "input activation") : Tensor();
        model::LossSum l;
        Tensor y = stage.forward(mb, inputs[size_t(mb)].data(), targets[size_t(mb)].data(), x, B, T,
                                 grad_scale, &l);
        if (g + 1 < n_virtual) {
          act_out[key] = y;
        } else {
          // Micro-batches reach the last stage in order in every schedule, so this sums in
          // the serial trainer's order.
          loss_sum += l.sum;
          count += l.count;
        }
        break;
      }
      case ActionKind::backward: {
        wait_recvs();
        Tensor dy = g + 1 < n_virtual ? take(grad_in, key, "output gradient") : Tensor();
        Tensor dx = stage.backward(mb, dy);
        if (g > 0) grad_out[key] = dx;
        break;
      }
      case ActionKind::send_activation: {
        LOOM_ASSERT(a.peer == (g + 1) % n_pp, "SendAct at {} to {}", g, a.peer);
        sends.push_back(pp_.isend(take(act_out, key, "activation to send"), a.peer,
                                  p2p_tag(Stream::activation, mb, g, n_virtual)));
        break;
      }
      case ActionKind::send_grad: {
        LOOM_ASSERT(a.peer == (g - 1) % n_pp, "SendGrad at {} to {}", g, a.peer);
        sends.push_back(pp_.isend(take(grad_out, key, "gradient to send"), a.peer,
                                  p2p_tag(Stream::grad, mb, g, n_virtual)));
        break;
      }
    }
  }
  wait_recvs();
  for (auto& w : sends) w.wait();
  LOOM_ASSERT(act_in.empty() && grad_in.empty() && act_out.empty() && grad_out.empty(),
              "{} pipeline step left tensors unconsumed (schedule bug)", pp_.prefix());
  for (auto& c : chunks_)
    LOOM_ASSERT(c->in_flight() == 0, "{} chunk left {} micro-batches without backward",
                pp_.prefix(), c->in_flight());

  // Data parallel: every chunk's gradient summed over dp.
  if (dp_.valid()) {
    std::vector<comm::Work> reduces;
    for (auto& c : chunks_)
      reduces.push_back(dp_.all_reduce(comm::BufferRef(c->grads(), c->total(), DType::f32)));
    for (auto& w : reduces) w.wait();
  }

  // Tied embedding: sum the embedding's and the head's gradient contributions.
  const int64_t VC = chunks_[0]->global_layout().specs()[0].numel;  // (V/tp) x C
  if (embedding_.valid()) {
    for (auto& c : chunks_)
      if (c->span().has_embedding || c->span().has_head)
        embedding_.all_reduce(comm::BufferRef(c->grads() + c->token_embedding(), VC, DType::f32))
            .wait();
  }

  // Tensor parallel: replicated tensors' partial gradients (from each rank's rows) summed.
  if (tp_.valid()) {
    for (auto& c : chunks_) {
      int64_t n = 0;
      for (const model::StageParam& p : c->params())
        if (p.global.replicated()) n += p.global.numel;
      if (n == 0) continue;
      std::vector<float> buf(static_cast<size_t>(n));
      float* q = buf.data();
      for (const model::StageParam& p : c->params())
        if (p.global.replicated())
          q = std::copy(c->grads() + p.local_offset, c->grads() + p.local_offset + p.global.numel, q);
      tp_.all_reduce(comm::BufferRef(buf.data(), n, DType::f32)).wait();
      q = buf.data();
      for (const model::StageParam& p : c->params())
        if (p.global.replicated()) {
          std::copy(q, q + p.global.numel, c->grads() + p.local_offset);
          q += p.global.numel;
        }
    }
  }

  // Global grad norm: this rank's squares in chunk order (the head's tied copy, which is the
  // first VC elements of its buffer, skipped), then summed over pp (and tp: replicated tensors
  // counted on tp rank 0 only).
  double squares = 0;
  for (auto& c : chunks_) {
    if (tp_.valid()) {
      for (const model::StageParam& p : c->params())
        if (!p.tied_copy && (!p.global.replicated() || tp_.rank() == 0))
          squares += kernels::sum_squares(c->grads() + p.local_offset, p.global.numel);
      continue;
    }
    int64_t skip = 0;
    if (c->span().has_head && !c->span().has_embedding) {
      LOOM_ASSERT(c->token_embedding() == 0, "tied copy expected at offset 0, got {}",
                  c->token_embedding());
      skip = VC;
    }
    squares += kernels::sum_squares(c->grads() + skip, c->total() - skip);
  }
  pp_.all_reduce(comm::BufferRef(&squares, 1, DType::f64)).wait();
  if (tp_.valid()) tp_.all_reduce(comm::BufferRef(&squares, 1, DType::f64)).wait();
  const double norm = std::sqrt(squares);
  const float factor = pc_.optim.clip > 0 ? kernels::clip_factor(norm, pc_.optim.clip) : 1.0f;

  ++step_;
  PipelineStepStats s;
  s.lr = optim::lr_at(pc_.optim, step_);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    optimizers_[i]->step(step_, factor);
    if (pc_.zero >= 1 && dp_.valid()) {
      // ZeRO-1: every dp rank's updated share to the others.
      const int64_t n = chunks_[i]->total(), share = (n + dp_.size() - 1) / dp_.size();
      std::vector<comm::Work> works;
      for (int r = 0; r < dp_.size(); ++r) {
        const int64_t lo = std::min(n, share * r), hi = std::min(n, lo + share);
        if (hi > lo)
          works.push_back(dp_.broadcast(
              comm::BufferRef(chunks_[i]->weights() + lo, hi - lo, DType::f32), r));
      }
      for (auto& w : works) w.wait();
    }
    chunks_[i]->sync_low_precision_weights();
  }

  // The loss lives on the rank of the last virtual stage (pp-1); every pp rank logs it.
  double loss_buf[2] = {loss_sum, double(count)};
  pp_.broadcast(comm::BufferRef(loss_buf, 2, DType::f64), n_pp - 1).wait();
  if (dp_.valid()) dp_.all_reduce(comm::BufferRef(loss_buf, 2, DType::f64)).wait();
  s.step = step_;
  s.loss_sum = loss_buf[0];
  s.tokens = int64_t(loss_buf[1]);
  s.loss = s.tokens ? s.loss_sum / double(s.tokens) : 0.0;
  s.grad_norm = norm;
  return s;
}

}  // namespace loom::train

// interop/extract.h: sub-model extraction (PanGu-Σ, Ren et al. 2023, section 3.3): the experts of
// one domain of an rre MoE model, with the dense backbone, form a smaller model that gives the
// same outputs on that domain's tokens.
//
// With the Random Routed Experts router (model/moe.h) a token of domain d only ever reaches the
// experts [d*G, (d+1)*G) of each sparse block, chosen by row d of the block's routing table. So
// the model with one domain, those G experts per sparse block (renumbered 0..G-1) and that table
// row computes exactly the full model's function on domain-d tokens: the same tensors meet the
// same tokens in the same order (logits equal bit for bit on the same kernels).
//
// The extracted config: the source's, with name "<name>-<domain>", moe.domains = [<domain>],
// experts = experts_per_domain = G. A single-domain model sends every token to its domain
// (MoeConfig::other_domain), so it needs no "other" and takes unknown-language tokens too.
// The topk router has no such structure (any token may pick any expert by its learned gate), so
// extraction refuses it.
#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"

namespace loom::interop {

// The config of `cfg`'s sub-model for domain index d (see above). Throws loom::Error for models
// without rre domains (naming why) and d outside [0, D).
model::ModelConfig extracted_config(const model::ModelConfig& cfg, int32_t d);

struct ExtractReport {
  std::string domain;
  int64_t params_full = 0, params_extracted = 0;  // num_params()
  int64_t weight_bytes_full = 0, weight_bytes_extracted = 0;  // f32 parameters + rre tables
  int64_t bytes_full = 0, bytes_extracted = 0;  // the checkpoint directories on disk (the
                                                // source's with its optimizer state, if any)
};

// Reads the checkpoint `checkpoint_dir` (flat or sharded: interop::CheckpointReader, checksums
// verified) and writes the sub-model of domain `domain` (a name, ModelConfig::domain_index) to
// `out_dir` as a flat checkpoint without optimizer state, tensor by tensor (peak memory: the
// largest tensor), with the tokenizer copied when the source has one. Throws loom::Error naming
// the problem (topk, unknown domain, out_dir already existing and not empty).
ExtractReport extract_domain(const std::string& checkpoint_dir, const std::string& domain,
                             const std::string& out_dir);

}  // namespace loom::interop

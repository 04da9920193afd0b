// `loom generate --checkpoint DIR (--prompt TEXT | --prompts-file FILE.jsonl) [--max-tokens N]
//  [--temperature T] [--top-p P] [--top-k K] [--repetition-penalty R] [--seed S] [--stop STR]...
//  [--stop-rule LANG] [--dtype f32|bf16] [--int8] [--max-batch B] [--tokenizer PATH]
//  [--no-token-healing] [--tp N] [--domain NAME] [--kv-dtype auto|f32|bf16]
//  [--kv-memory SIZE | --kv-blocks N] [--batch-invariant]`: sampling from a checkpoint through infer::Engine (KV cache,
//  continuous
// batching). One prompt: the prompt, then the completion streamed to stdout token by token.
// A prompts file: one JSON object per line ({"prompt": ..., optional per-line overrides of
// max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, stop_rule,
// token_healing, and "domain" for MoE models}); all prompts share the running batch, and one JSON line per prompt is printed,
// in input order, as soon as it and every earlier prompt are done: index, prompt, completion,
// finish_reason, prompt_tokens, completion_tokens, tokens and logprobs (each token's
// log-probability after temperature, as serve's logprobs report it).
// `--domain NAME`: MoE (rre) models route every prompt's tokens by that domain (default: the
// model's "other"); an unknown name is an error listing the model's domains.
// `--tp N` under `mpirun -np N`: the weights are sharded over the N ranks (tensor parallel);
// every rank runs the same engine steps in lockstep and rank 0 prints.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "infer/engine.h"
#include "kv_flags.h"

namespace {

using loom::infer::SamplingParams;


// Applies a prompts-file line's overrides to `p`; unknown keys and wrong types are errors naming
// the line and the key.
void apply_overrides(const nlohmann::json& j, SamplingParams& p, const std::string& where) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    auto need = [&](bool ok, const char* what) {
      LOOM_CHECK(ok, "{}: \"{}\" must be {}, got {}", where, k, what, v.dump());
    };
    if (k == "prompt") {
      need(v.is_string(), "a string");
    } else if (k == "domain") {  // read by the caller (a request field, not a sampling one)
      need(v.is_string(), "a domain name (MoE models)");
    } else if (k == "max_tokens") {
      need(v.is_number_integer(), "an integer");
      p.max_tokens = v.get<int64_t>();
    } else if (k == "temperature") {
      need(v.is_number(), "a number");
      p.temperature = v.get<float>();
    } else if (k == "top_p") {
      need(v.is_number(), "a number");
      p.top_p = v.get<float>();
    } else if (k == "top_k") {
      need(v.is_number_integer(), "an integer");
      p.top_k = v.get<int32_t>();
    } else if (k == "repetition_penalty") {
      need(v.is_number(), "a number");
      p.repetition_penalty = v.get<float>();
    } else if (k == "seed") {
      need(v.is_number_unsigned(), "an integer >= 0");
      p.seed = v.get<uint64_t>();
    } else if (k == "stop") {
      need(v.is_string() || v.is_array(), "a string or a list of strings");
      p.stop.clear();
      if (v.is_string()) {
        p.stop.push_back(v.get<std::string>());
      } else {
        for (const auto& s : v) {
          need(s.is_string(), "a string or a list of strings");
          p.stop.push_back(s.get<std::string>());
        }
      }
    } else if (k == "stop_rule") {
      need(v.is_string(), "a language name (python, cpp, java, js, go, rust) or \"\"");
      p.stop_rule = v.get<std::string>();
    } else if (k == "token_healing") {
      need(v.is_boolean(), "true or false");
      p.token_healing = v.get<bool>();
    } else {
      LOOM_FAIL(
          "{}: unknown key \"{}\"; allowed: prompt, max_tokens, temperature, top_p, top_k, "
          "repetition_penalty, seed, stop, stop_rule, token_healing, domain",
          where, k);
    }
  }
}

struct GenerateOptions {
  std::string checkpoint, prompt, prompts_file, tokenizer, dtype = "f32", stop_rule, domain;
  std::vector<std::string> stop;
  int64_t max_tokens = 64, max_batch = 8;
  int tp = 1;
  float temperature = 0.8f, top_p = 0.95f, repetition_penalty = 1.f;
  int32_t top_k = 0;
  uint64_t seed = 1;
  std::string head_dtype = "auto";
  bool no_heal = false, int8 = false, int8_head = false, batch_invariant = false;
  loom::cli::KvFlags kv;
};

// Loads the engine (this rank's shard under tp), submits every prompt and steps until all are
// done; rank 0 streams (one prompt) or prints JSON lines (prompts file).
void run_generate_ranks(const GenerateOptions& opt, const std::vector<std::string>& prompts,
                        const std::vector<SamplingParams>& params,
                        const std::vector<std::string>& domains,
                        const loom::comm::ProcessGroup* tp) {
  using namespace loom;
  const GenerateOptions* o = &opt;
  const bool rank0 = !tp || tp->rank() == 0;
  infer::EngineOptions eo;
  eo.tp = tp;
  eo.max_batch = o->max_batch;
  eo.max_queue = int64_t(prompts.size());
  eo.start_thread = false;  // this thread drives the steps and prints as events arrive
  eo.default_domain = o->domain;  // checked against the model's domains when the engine loads
  infer::WeightFormats wf = infer::weight_formats_from_flags(o->dtype, o->int8, o->int8_head,
      o->head_dtype);
  wf.batch_invariant = o->batch_invariant;
  cli::apply_kv_flags(o->kv, wf.base, eo);
  auto engine = infer::load_engine(o->checkpoint, o->tokenizer, wf, eo);
  const int64_t ctx_len = engine->context_length();

  struct Result {
    std::string text;
    std::vector<int32_t> tokens;
    std::vector<float> logprobs;  // each token's (TokenEvent::logprob)
    std::string finish;
    int64_t prompt_tokens = 0, completion_tokens = 0;
    bool done = false;
  };
  std::vector<Result> results(prompts.size());
  const bool stream = o->prompts_file.empty();
  size_t next_to_print = 0;
  auto print_ready = [&] {
    while (next_to_print < results.size() && results[next_to_print].done) {
      const Result& r = results[next_to_print];
      nlohmann::json j = {{"index", next_to_print},
                          {"prompt", prompts[next_to_print]},
                          {"completion", r.text},
                          {"finish_reason", r.finish},
                          {"prompt_tokens", r.prompt_tokens},
                          {"completion_tokens", r.completion_tokens},
                          {"tokens", r.tokens},
                          {"logprobs", r.logprobs}};
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
      std::fflush(stdout);
      ++next_to_print;
    }
  };
  std::string error;
  for (size_t i = 0; i < prompts.size(); ++i) {
    infer::Request req;
    req.prompt = engine->encode(prompts[i]);
    const std::string where =
        stream ? std::string("the prompt") : fmt::format("prompt {} (line order)", i);
    LOOM_CHECK(!req.prompt.empty(), "{} encodes to no tokens", where);
    const int64_t P = int64_t(req.prompt.size());
    LOOM_CHECK(P < ctx_len,
               "{} is {} tokens but the model's context is {} tokens; shorten it to at most {}",
               where, P, ctx_len, ctx_len - 1);
    req.params = params[i];
    req.domain = domains[i];  // "" = --domain (the engine's default)
    if (P + req.params.max_tokens > ctx_len) {
      if (rank0)
        std::fprintf(stderr, "note: %s: max tokens %lld cut to %lld to fit the context of %lld\n",
                     where.c_str(), (long long)req.params.max_tokens, (long long)(ctx_len - P),
                     (long long)ctx_len);
      req.params.max_tokens = ctx_len - P;
    }
    req.on_event = [&, i](const infer::TokenEvent& ev) {
      Result& r = results[i];
      r.text += ev.text;
      if (ev.token >= 0) {
        r.tokens.push_back(ev.token);
        r.logprobs.push_back(ev.logprob);
      }
      if (stream && rank0 && !ev.text.empty()) {
        std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
        std::fflush(stdout);
      }
      if (ev.finish != infer::FinishReason::none) {
        r.done = true;
        r.finish = infer::finish_reason_name(ev.finish);
        r.prompt_tokens = ev.prompt_tokens;
        r.completion_tokens = ev.completion_tokens;
        if (ev.finish == infer::FinishReason::error && error.empty()) error = ev.error;
      }
    };
    if (stream && rank0) {
      std::fwrite(prompts[i].data(), 1, prompts[i].size(), stdout);
      std::fflush(stdout);
    }
    const infer::SubmitResult s = engine->submit(std::move(req));
    LOOM_CHECK(s.status == infer::SubmitResult::Status::ok, "{}: {}", where, s.message);
  }
  while (engine->step())
    if (!stream && rank0) print_ready();
  if (stream && rank0) std::printf("\n");
  LOOM_CHECK(error.empty(), "generation failed: {}", error);
}

void add_generate(CLI::App& root, loom::cli::Context& ctx) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* sub = root.add_subcommand("generate", "sample completions from a checkpoint");
  sub->add_option("--checkpoint", o->checkpoint, "checkpoint directory")->required();
  auto* one = sub->add_option("--prompt", o->prompt, "prompt text");
  auto* many = sub->add_option("--prompts-file", o->prompts_file,
                               "JSONL file: one {\"prompt\": ..., overrides} object per line");
  one->excludes(many);
  sub->add_option("--max-tokens", o->max_tokens, "tokens to generate (at most the context left)");
  sub->add_option("--temperature", o->temperature, "sampling temperature (0 = greedy)");
  sub->add_option("--top-p", o->top_p, "nucleus sampling mass");
  sub->add_option("--top-k", o->top_k, "sample among the k most likely tokens (0 = off)");
  sub->add_option("--repetition-penalty", o->repetition_penalty,
                  "CTRL repetition penalty (1 = off, 1.1-1.3 is usual)");
  sub->add_option("--seed", o->seed, "sampling seed");
  sub->add_option("--stop", o->stop, "stop string (repeatable); excluded from the output");
  sub->add_option("--stop-rule", o->stop_rule,
                  "HumanEval-X stop rule of a language: python, cpp, java, js, go, rust");
  sub->add_option("--dtype", o->dtype, "weight storage: f32 or bf16")
      ->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_flag("--int8", o->int8, "quantize the linears and the tied head to int8 per output row at load time");
  sub->add_flag("--int8-head", o->int8_head, "with --int8: --head-dtype int8 (the default since --int8 quantizes the head)");
  sub->add_option("--head-dtype", o->head_dtype,
                  "tied LM head storage: auto (int8 with --int8, else --dtype), f32, bf16 or int8")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "int8"}));
  sub->add_option("--max-batch", o->max_batch, "sequences decoded together (prompts file)");
  loom::cli::add_kv_flags(sub, o->kv);
  loom::cli::add_batch_invariant_flag(sub, o->batch_invariant);
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer (default: DIR/tokenizer)");
  sub->add_option("--tp", o->tp, "tensor-parallel size; run under mpirun -np N");
  sub->add_option("--domain", o->domain,
                  "MoE (rre) models: the domain the prompts are routed by, e.g. python "
                  "(default: the model's \"other\")");
  sub->add_flag("--no-token-healing", o->no_heal,
                "keep the prompt's last token as encoded (default: back it up and let the first "
                "sampled token complete it)");
  sub->callback([o, &ctx] {
    using namespace loom;
    LOOM_CHECK(!o->prompt.empty() || !o->prompts_file.empty(),
               "give a prompt: --prompt TEXT or --prompts-file FILE.jsonl");
    LOOM_CHECK(o->top_p > 0.f && o->top_p <= 1.f, "--top-p {} must be in (0, 1]", o->top_p);
    // NaN compares false with everything and inf divides every logit to 0: both would sample
    // garbage without an error, so only finite temperatures >= 0 are accepted.
    LOOM_CHECK(std::isfinite(o->temperature) && o->temperature >= 0.f,
               "--temperature {} must be a finite number >= 0 (0 = greedy; 0.2-1.0 is usual)",
               o->temperature);
    LOOM_CHECK(o->top_k >= 0, "--top-k {} must be >= 0 (0 = off)", o->top_k);
    LOOM_CHECK(std::isfinite(o->repetition_penalty) && o->repetition_penalty > 0.f,
               "--repetition-penalty {} must be a finite number > 0 (1 = off)",
               o->repetition_penalty);
    LOOM_CHECK(o->max_tokens >= 0, "--max-tokens {} must be >= 0", o->max_tokens);
    LOOM_CHECK(o->max_batch >= 1, "--max-batch {} must be >= 1", o->max_batch);
    SamplingParams base;
    base.temperature = o->temperature;
    base.top_p = o->top_p;
    base.top_k = o->top_k;
    base.repetition_penalty = o->repetition_penalty;
    base.seed = o->seed;
    base.max_tokens = o->max_tokens;
    base.stop = o->stop;
    base.stop_rule = o->stop_rule;
    base.token_healing = !o->no_heal;
    infer::validate_sampling(base);
    infer::stop_rule_from_name(base.stop_rule);

    // Prompts and their parameters, all validated before the model loads.
    std::vector<std::string> prompts;
    std::vector<SamplingParams> params;
    std::vector<std::string> domains;  // per prompt ("" = --domain)
    if (!o->prompts_file.empty()) {
      std::ifstream in(o->prompts_file);
      LOOM_CHECK(in.good(), "cannot open --prompts-file '{}'", o->prompts_file);
      std::string line;
      for (int64_t n = 1; std::getline(in, line); ++n) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = fmt::format("{} line {}", o->prompts_file, n);
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const std::exception& e) {
          LOOM_FAIL("{}: not valid JSON ({})", where, e.what());
        }
        LOOM_CHECK(j.is_object() && j.contains("prompt") && j["prompt"].is_string(),
                   "{}: each line must be an object with a string \"prompt\"", where);
        SamplingParams p = base;
        apply_overrides(j, p, where);
        try {
          infer::validate_sampling(p);
          infer::stop_rule_from_name(p.stop_rule);
        } catch (const Error& e) {
          LOOM_FAIL("{}: {}", where, e.what());
        }
        prompts.push_back(j["prompt"].get<std::string>());
        params.push_back(p);
        domains.push_back(j.value("domain", std::string()));
      }
      LOOM_CHECK(!prompts.empty(), "--prompts-file '{}' holds no prompts", o->prompts_file);
    } else {
      prompts.push_back(o->prompt);
      params.push_back(base);
      domains.emplace_back();
    }

    LOOM_CHECK(o->tp >= 1, "--tp {} must be >= 1", o->tp);
    std::unique_ptr<comm::MpiRuntime> mpi;
    comm::ProcessGroup world;
    if (o->tp > 1) {
      LOOM_CHECK(loom::cli::launched_by_mpi(),
                 "--tp {} needs {} processes: run `mpirun -np {} loom generate "
                 "... --tp {}`",
                 o->tp, o->tp, o->tp, o->tp);
      mpi = std::make_unique<comm::MpiRuntime>(nullptr, nullptr);
      world = comm::ProcessGroup::world();
      LOOM_CHECK(world.size() == o->tp,
                 "--tp {} but mpirun started {} ranks; use mpirun -np {} (one tp group)", o->tp,
                 world.size(), o->tp);
    }
    try {
      run_generate_ranks(*o, prompts, params, domains, o->tp > 1 ? &world : nullptr);
    } catch (const std::exception& e) {
      // One rank's failure ends the whole job now, naming the rank (comm/mpi_runtime.h).
      if (o->tp > 1) comm::abort_world(e.what());
      throw;
    }
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(generate, add_generate);

// Router embeddings (after "Your MoE LLM is secretly an embedding model" and the GigaChat expert-concentration
// study): a text's embedding is the [MoE layers, E] matrix of expert activation frequencies — at MoE layer i, the
// number of the text's tokens whose top-k set contains routed expert j, divided by its number of tokens. Every row
// sums to k; shared experts (never routed) are left out. Tokens are counted as the tokenizer encodes the text
// (a BOS it adds included). With a window W the text is also cut into windows of W tokens (the last one shorter),
// each embedded over its own tokens; routing is always computed over the whole text, so a window's tokens see their
// real left context.
#pragma once
#include <string>
#include <vector>

#include "tracing/routing.h"

namespace moedit {

struct RouterEmbedding {
  int text = 0;    // index of the text
  int start = 0;   // first token (0 for a whole text)
  int tokens = 0;  // tokens counted
  bool window = false;
  MatR freq;       // [n MoE layers, E]
};

struct EmbedOptions {
  int window = 0;  // > 0: also every window of this many tokens
  RoutingOptions routing;
};

// Whole-text embeddings (one per text, in order), then (with a window) each text's windows in order.
std::vector<RouterEmbedding> router_embeddings(const Model& m, const std::vector<std::vector<int32_t>>& texts,
                                               const EmbedOptions& opt = {});

// The embeddings as a NumPy .npy file: float32 [n, n MoE layers, E], C order.
std::string embeddings_npy(const std::vector<RouterEmbedding>& e);

}  // namespace moedit

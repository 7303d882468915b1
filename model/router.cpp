// A config's router as kernel data (see model/router.h).
#include "model/router.h"

namespace moedit {

WeightMode weight_mode(const ModelConfig& c) {
  const bool replaces = c.arch->norm_replaces_scaling;
  const bool norm = c.norm_topk_prob && !(replaces && c.top_k == 1);
  return {norm, !(norm && replaces) && c.routed_scaling != 1.f, c.arch->deepseek_router ? 1e-20 : 0.0};
}

ops::RouteSpec route_spec(const ModelConfig& c) {
  using S = ops::RouteSpec;
  S s;
  s.score = c.router == RouterKind::TopKSoftmax   ? S::Score::TopKThenSoftmax
            : c.router == RouterKind::SigmoidTopK ? S::Score::Sigmoid
                                                  : S::Score::Softmax;
  s.E = c.n_experts;
  s.k = c.top_k;
  s.groups = c.group_limit == GroupLimit::MaxScore    ? S::Groups::MaxScore
             : c.group_limit == GroupLimit::TopTwoSum ? S::Groups::TopTwoSum
                                                      : S::Groups::None;
  s.n_group = c.n_group;
  s.topk_group = c.topk_group;
  const WeightMode mode = weight_mode(c);
  s.renorm = mode.norm && c.router != RouterKind::TopKSoftmax;
  s.renorm_eps = mode.eps;
  s.scale = mode.scale;
  s.scaling = c.routed_scaling;
  return s;
}

}  // namespace moedit

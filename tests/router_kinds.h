// Every router kind moedit routes with, as ops::RouteSpec (softmax, renormalised, scaled, top-k-then-softmax, group
// limits of DeepSeek-V2 and V3, sigmoid with a selection bias), with the expert counts of real models — for the
// routing op tests of every backend, forward and backward.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "kernels/route.h"

namespace moedit::test {

struct RouterKind {
  std::string name;
  ops::RouteSpec spec;
  bool bias;  // route with a selection bias
};

inline std::vector<RouterKind> router_kinds() {
  using S = ops::RouteSpec;
  auto spec = [](S::Score score, int E, int k) {
    S s;
    s.score = score;
    s.E = E;
    s.k = k;
    return s;
  };
  std::vector<RouterKind> kinds;
  kinds.push_back({"softmax", spec(S::Score::Softmax, 16, 4), false});
  S s = spec(S::Score::Softmax, 60, 4);
  s.renorm = true;
  kinds.push_back({"softmax+renorm (OLMoE/Qwen)", s, false});
  s = spec(S::Score::Softmax, 16, 2);
  s.scale = true;
  s.scaling = 2.5f;
  kinds.push_back({"softmax+scale", s, false});
  s = spec(S::Score::TopKThenSoftmax, 16, 3);
  kinds.push_back({"topk-then-softmax (Granite)", s, false});
  s.scale = true;
  s.scaling = 0.7f;
  kinds.push_back({"topk-then-softmax+scale", s, false});
  s = spec(S::Score::Softmax, 64, 6);
  s.groups = S::Groups::MaxScore;
  s.n_group = 8;
  s.topk_group = 3;
  s.scale = true;
  s.scaling = 16.f;
  kinds.push_back({"softmax+groups(max) (DeepSeek-V2)", s, false});
  s = spec(S::Score::Sigmoid, 64, 8);
  s.groups = S::Groups::TopTwoSum;
  s.n_group = 8;
  s.topk_group = 4;
  s.renorm = true;
  s.renorm_eps = 1e-20;
  s.scale = true;
  s.scaling = 2.5f;
  kinds.push_back({"sigmoid+bias+groups(top2) (DeepSeek-V3)", s, true});
  kinds.push_back({"sigmoid+bias, no groups", spec(S::Score::Sigmoid, 16, 4), true});
  kinds.push_back({"softmax+bias", spec(S::Score::Softmax, 16, 4), true});
  return kinds;
}

}  // namespace moedit::test

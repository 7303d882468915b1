#include "eval/attention_gain.h"

#include <cmath>
#include <cstdio>
#include <limits>

#include "io/errors.h"
#include "model/backward.h"
#include "tracing/svg.h"

namespace moedit::eval {
using json = nlohmann::json;

LensMeasures measure_lens(const Model& m, const std::vector<TaskItem>& items, int batch_tokens) {
  const int L = m.config().n_layers, n = int(items.size());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  LensMeasures r;
  r.context.setConstant(n, L, nan);
  r.answer.setConstant(n, L, nan);
  r.prob.setConstant(n, L, nan);
  for (int begin = 0; begin < n;) {
    std::vector<std::vector<int32_t>> seqs;
    std::vector<int32_t> flat;
    int end = begin;
    for (size_t tokens = 0; end < n; ++end) {
      const auto& p = items[size_t(end)].prompt;
      require_input(!p.empty(), "a prompt encodes to no tokens");
      if (end > begin && tokens + p.size() > size_t(batch_tokens)) break;
      tokens += p.size();
      seqs.push_back(p);
      flat.insert(flat.end(), p.begin(), p.end());
    }
    const TokenLayout layout = make_layout(seqs, nullptr);
    MatR x = m.embed(flat, layout, nullptr);  // [N, H], becomes each block's output in turn
    for (int l = 0; l < L; ++l) {
      grad::BlockTape<float> tape;
      grad::block_forward<float>(m, l, x, layout, nullptr, tape);
      MatR last(MatR::Index(seqs.size()), x.cols());  // h_l at each prompt's last token [n_seqs, H]
      for (size_t s = 0; s < tape.probs.size(); ++s) {
        const int b = tape.seg_begin[s], P = tape.seg_end[s] - b, q = P - 1, row = tape.seg_seq[s];
        const TaskItem& it = items[size_t(begin + row)];
        const MatR& pr = tape.probs[s];  // [Hq·P, P]: row h·P + i holds query i of head h
        const int Hq = int(pr.rows()) / P;
        auto mass = [&](int j0, int j1) {
          double sum = 0;
          for (int h = 0; h < Hq; ++h)
            for (int j = j0; j < j1; ++j) sum += pr(h * P + q, j);
          return sum / Hq;
        };
        r.context(begin + row, l) = mass(it.ctx_begin, it.ctx_end);
        if (it.ans_begin >= 0) r.answer(begin + row, l) = mass(it.ans_begin, it.ans_end);
        last.row(row) = x.row(b + q);
      }
      const MatR lg = m.logits(last, layout, nullptr);  // [n_seqs, V]
      for (int s = 0; s < lg.rows(); ++s) {
        double mx = -std::numeric_limits<double>::infinity(), z = 0;
        for (int v = 0; v < lg.cols(); ++v) mx = std::max(mx, double(lg(s, v)));
        for (int v = 0; v < lg.cols(); ++v) z += std::exp(double(lg(s, v)) - mx);
        const int a = items[size_t(begin + s)].answer[0];
        r.prob(begin + s, l) = std::exp(double(lg(s, a)) - mx) / z;
      }
    }
    begin = end;
  }
  return r;
}

namespace {
// Per layer: mean over the examples with finite values in both of (t − b), and the means of b and t over them.
void gain(const Eigen::MatrixXd& b, const Eigen::MatrixXd& t, std::vector<double>& d, std::vector<double>& mb,
          std::vector<double>& mt) {
  for (int l = 0; l < b.cols(); ++l) {
    double sb = 0, st = 0;
    int n = 0;
    for (int i = 0; i < b.rows(); ++i)
      if (std::isfinite(b(i, l)) && std::isfinite(t(i, l))) sb += b(i, l), st += t(i, l), ++n;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    mb.push_back(n ? sb / n : nan);
    mt.push_back(n ? st / n : nan);
    d.push_back(n ? (st - sb) / n : nan);
  }
}
json finite_or_null(const std::vector<double>& v) {
  json j = json::array();
  for (double x : v) j.push_back(std::isfinite(x) ? json(x) : json());
  return j;
}
}  // namespace

AttentionGain attention_gain(const LensMeasures& base, const LensMeasures& tuned) {
  require_input(base.context.rows() == tuned.context.rows() && base.context.cols() == tuned.context.cols(),
                "attention-gain: the two models were measured on different examples or layer counts");
  AttentionGain g;
  g.examples = int(base.context.rows());
  gain(base.context, tuned.context, g.cag, g.base_context, g.tuned_context);
  gain(base.answer, tuned.answer, g.aag, g.base_answer, g.tuned_answer);
  gain(base.prob, tuned.prob, g.apg, g.base_prob, g.tuned_prob);
  return g;
}

json AttentionGain::to_json() const {
  return {{"examples", examples},
          {"cag", finite_or_null(cag)},
          {"aag", finite_or_null(aag)},
          {"apg", finite_or_null(apg)},
          {"base", {{"context_attention", finite_or_null(base_context)},
                    {"answer_attention", finite_or_null(base_answer)},
                    {"answer_probability", finite_or_null(base_prob)}}},
          {"tuned", {{"context_attention", finite_or_null(tuned_context)},
                     {"answer_attention", finite_or_null(tuned_answer)},
                     {"answer_probability", finite_or_null(tuned_prob)}}}};
}

std::string AttentionGain::table() const {
  std::string out = "attention gain of TUNED over BASE on " + std::to_string(examples) +
                    " examples (means per layer; C: attention to the context, A: to the answer in the context, P: "
                    "logit-lens p(answer))\n";
  char b[256];
  std::snprintf(b, sizeof b, "%5s %10s %10s %10s | %8s %8s %8s %8s %9s %9s\n", "layer", "CAG", "AAG", "APG", "C base",
                "C tuned", "A base", "A tuned", "P base", "P tuned");
  out += b;
  for (size_t l = 0; l < cag.size(); ++l) {
    std::snprintf(b, sizeof b, "%5zu %+10.5f %+10.5f %+10.6f | %8.4f %8.4f %8.4f %8.4f %9.6f %9.6f\n", l, cag[l],
                  aag[l], apg[l], base_context[l], tuned_context[l], base_answer[l], tuned_answer[l], base_prob[l],
                  tuned_prob[l]);
    out += b;
  }
  return out;
}

std::string AttentionGain::svg(const std::string& metric) const {
  namespace svg = trace::svg;
  svg::LineChart c;
  const std::vector<double>* v = nullptr;
  if (metric == "cag") v = &cag, c.title = "Context attention gain (CAG) per layer", c.ylabel = "CAG";
  else if (metric == "aag") v = &aag, c.title = "Answer attention gain (AAG) per layer", c.ylabel = "AAG";
  else if (metric == "apg") v = &apg, c.title = "Answer probability gain (APG, logit lens) per layer", c.ylabel = "APG";
  else throw std::invalid_argument("AttentionGain::svg: unknown metric " + metric);
  for (size_t l = 0; l < v->size(); ++l) c.x_labels.push_back(std::to_string(l));
  c.series.push_back({"tuned − base, mean of " + std::to_string(examples) + " examples", *v, "#d62728"});
  return svg::line_chart(c);
}

}  // namespace moedit::eval

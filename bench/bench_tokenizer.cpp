// Tokenizer benchmark: encodes WikiText-2 test (1.29 MB) with moedit::Tokenizer on one thread, full encode (ids,
// pieces, char and byte offsets), best of R runs, in two modes:
//   whole  the file as one string
//   lines  each line (split on "\n") as its own string
// bench/bench_tokenizer.sh runs this next to Hugging Face `tokenizers` (RAYON_NUM_THREADS=1) and prints the ratio.
//
//   bench_tokenizer --tokenizer PATH [--text FILE] [--reps R] [--json]
//     PATH: tokenizer.json or a folder holding one; FILE defaults to datasets/data/wikitext-2/wiki.test.raw
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "io/errors.h"
#include "tokenizer/tokenizer.h"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  std::string tok_path, text_path = std::string(MOEDIT_SOURCE_DIR) + "/datasets/data/wikitext-2/wiki.test.raw";
  int reps = 5;
  bool as_json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--tokenizer" && i + 1 < argc)
      tok_path = argv[++i];
    else if (a == "--text" && i + 1 < argc)
      text_path = argv[++i];
    else if (a == "--reps" && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--json")
      as_json = true;
    else {
      std::fprintf(stderr, "usage: bench_tokenizer --tokenizer PATH [--text FILE] [--reps R] [--json]\n");
      return 2;
    }
  }
  if (tok_path.empty()) {
    std::fprintf(stderr, "bench_tokenizer: --tokenizer PATH is required\n");
    return 2;
  }
  std::ifstream f(text_path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "bench_tokenizer: cannot read %s\n", text_path.c_str());
    return 2;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  std::vector<std::string> lines;
  for (size_t b = 0;;) {
    size_t e = text.find('\n', b);
    lines.push_back(text.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  try {
    auto t0 = Clock::now();
    const moedit::Tokenizer tok = moedit::Tokenizer::from_file(tok_path);
    const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
    // warm-up (also fills the per-thread BPE word cache, as a warm tokenizers instance would have)
    size_t whole_tokens = tok.encode(text).size();
    double whole_s = 1e300, lines_s = 1e300;
    size_t lines_tokens = 0;
    for (int r = 0; r < reps; ++r) {
      auto a = Clock::now();
      whole_tokens = tok.encode(text).size();
      whole_s = std::min(whole_s, std::chrono::duration<double>(Clock::now() - a).count());
    }
    for (int r = 0; r < reps; ++r) {
      auto a = Clock::now();
      size_t n = 0;
      for (const std::string& l : lines) n += tok.encode(l).size();
      lines_s = std::min(lines_s, std::chrono::duration<double>(Clock::now() - a).count());
      lines_tokens = n;
    }
    if (as_json) {
      std::printf(
          "{\"load_s\": %.6f, \"bytes\": %zu, \"whole_s\": %.6f, \"whole_tokens\": %zu, \"lines_s\": %.6f, "
          "\"lines\": %zu, \"lines_tokens\": %zu}\n",
          load_s, text.size(), whole_s, whole_tokens, lines_s, lines.size(), lines_tokens);
    } else {
      std::printf("tokenizer %s (loaded in %.3f s), text %s (%zu bytes), best of %d, 1 thread\n", tok_path.c_str(),
                  load_s, text_path.c_str(), text.size(), reps);
      std::printf("  whole file : %8.4f s  %9zu tokens  %10.0f tokens/s  %6.2f MB/s\n", whole_s, whole_tokens,
                  double(whole_tokens) / whole_s, double(text.size()) / whole_s / 1e6);
      std::printf("  %zu lines: %8.4f s  %9zu tokens  %10.0f tokens/s  %6.2f MB/s\n", lines.size(), lines_s,
                  lines_tokens, double(lines_tokens) / lines_s, double(text.size()) / lines_s / 1e6);
    }
  } catch (const moedit::InputError& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 2;
  }
  return 0;
}

// Context-dependent QA examples (issue 19, Router Lens / CEFT; SQuAD / NQ-Swap-like): a JSON list of objects
//   {"context": str, "question": str, "answer": str,            required, non-empty
//    "case_id": int, "subject": str, "relation_id": str, "memory_answer": str, ...}   optional; others ignored
// The bundled task (datasets/data/context_task/{train,test}.json, tools/make_context_task.py) turns CounterFact
// records into counter-memory contexts; see datasets/data/context_task/README.md.
//
// The model reads prompt = context + " " + question and continues it with " " + answer (the answer's first token
// carries its leading space, as CounterFact targets do).
// Malformed input raises InputError naming the file, the example (index, and case_id when given) and the field.
#pragma once
#include <string>
#include <vector>

namespace moedit {

struct ContextExample {
  int case_id = -1;  // the record's case_id, else its index in the file
  std::string context, question, answer;
  std::string subject, relation_id, memory_answer;  // empty when absent

  std::string prompt() const { return context + " " + question; }
};

std::vector<ContextExample> load_context_task(const std::string& path);

// The bundled split "train" or "test" (datasets/data/context_task/<split>.json in the source tree).
std::string bundled_context_task_path(const std::string& split);

}  // namespace moedit

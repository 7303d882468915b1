// ROME's attribute_snippets.json: a list of {relation_id, target_id, samples: [{name, text}]} — Wikipedia snippets
// about subjects that truly have (relation, target). Used for the reference (consistency) and essence scores.
// Malformed entries raise InputError naming the file, the entry index and the field.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moedit {

struct Snippet {
  std::string name, text;
};

class AttributeSnippets {
 public:
  static AttributeSnippets load(const std::string& path);
  // The snippets of (relation_id, target_id); empty when there are none.
  const std::vector<Snippet>& get(const std::string& relation_id, const std::string& target_id) const;
  std::vector<std::string> all_texts() const;  // every snippet's text (ROME's TF-IDF refit corpus)
  size_t size() const;

 private:
  std::map<std::pair<std::string, std::string>, std::vector<Snippet>> by_fact_;
};

}  // namespace moedit

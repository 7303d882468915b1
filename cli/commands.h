// The `moedit` subcommands. Each cli/cmd_<name>.cpp registers itself with MOEDIT_COMMAND(order, fn): fn adds its
// CLI11 subcommand and callback; main.cpp adds them all in `order`. Callbacks throw moedit::InputError for bad input
// (exit 2).
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "model/model.h"

namespace moedit::cli {

// Where the bundled demo model lives: $MOEDIT_MODEL if set, else the source tree's models/moedit-demo.
std::string default_model_path();

// Adds the positional MODEL argument (defaults to the bundled model when omitted).
void add_model_arg(CLI::App* cmd, std::string& model);
// The flags that choose how a checkpoint is loaded (model/model.h LoadOptions): --deepseek-v2-transformers-norm, and
// with paging --mlock and --prefetch. Every command that loads a model has them.
void add_load_options(CLI::App* cmd, bool paging = true);
const LoadOptions& load_options();
// The subcommand `name` of a command that loads a model: app.add_subcommand, then add_model_arg and add_load_options.
CLI::App* add_model_command(CLI::App& app, const std::string& name, const std::string& about, std::string& model,
                            bool paging = true);
// A --json flag: "Print JSON" (+ what it prints).
CLI::Option* add_json_flag(CLI::App* cmd, bool& json, const std::string& what = "");
// Model::load with the loading flags given on the command line.
std::shared_ptr<Model> load_model(const std::string& path);

using RegisterFn = void (*)(CLI::App&);
struct CommandRegistrar {
  CommandRegistrar(int order, RegisterFn fn);
};
void register_all(CLI::App& app);

}  // namespace moedit::cli

// In a cli/cmd_*.cpp, at namespace scope:  MOEDIT_COMMAND(30, register_logits)
#define MOEDIT_COMMAND(order, fn) \
  static const ::moedit::cli::CommandRegistrar moedit_registrar_##fn{order, fn};

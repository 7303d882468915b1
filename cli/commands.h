// The `moedit` subcommands. Each cli/cmd_<name>.cpp defines one register_<name>() that adds its CLI11 subcommand
// and its callback; main.cpp calls them all. Callbacks throw moedit::InputError for bad input (exit 2).
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace moedit::cli {

// Where the bundled demo model lives: $MOEDIT_MODEL if set, else the source tree's models/ folder.
std::string default_model_path();

// Adds the positional MODEL argument (defaults to the bundled model when omitted).
void add_model_arg(CLI::App* cmd, std::string& model);

void register_info(CLI::App& app);
void register_logits(CLI::App& app);
void register_generate(CLI::App& app);
void register_tokenize(CLI::App& app);

}  // namespace moedit::cli

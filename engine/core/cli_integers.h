// Strict integer options for CLI11 command lines.
//
// CLI11 2.1 reads an integer option with strtoll/strtoull in base 0: "0100" is read as
// octal 64, "0x100" as 256, "-1" wraps to 2^64-1 in an unsigned option, and a number
// past 64 bits saturates without an error. StrictIntegers holds the command line to
// base-10 whole numbers, written the one way each is shown.
#pragma once

#include <CLI/CLI.hpp>

#include <charconv>
#include <cstdint>
#include <string>

namespace llamad {

// "" when `text` is a base-10 integer that fits 64 bits (unsigned: no sign) and has no
// leading zeros, so that CLI11's base-0 conversion reads the value it shows; else why not.
inline std::string DecimalIntegerError(const std::string& text, bool is_unsigned) {
  const char* first = text.data();
  const char* last = first + text.size();
  const char* digits = !is_unsigned && first != last && *first == '-' ? first + 1 : first;
  uint64_t unsigned_value = 0;
  int64_t signed_value = 0;
  const auto [end, ec] = is_unsigned ? std::from_chars(first, last, unsigned_value)
                                     : std::from_chars(first, last, signed_value);
  if (ec == std::errc::result_out_of_range) {
    return "'" + text + "' is out of range (" + (is_unsigned ? "0 to 2^64-1" : "-2^63 to 2^63-1") + ")";
  }
  if (ec != std::errc() || end != last || (last - digits > 1 && *digits == '0')) {
    return "'" + text + "' is not a " + (is_unsigned ? "non-negative " : "") +
           "whole number in base 10 (no '+', leading zeros, hex or exponent)";
  }
  return "";
}

// Adds the check to every integer option of `app` and of its subcommands. Call it once,
// after the options are added and before parsing. CLI11 names integer options by type:
// "INT" for signed, "UINT" for unsigned (followed by ":" and the other checks' texts).
inline void StrictIntegers(CLI::App& app) {
  for (CLI::Option* option : app.get_options()) {
    if (option->get_type_size_max() == 0) continue;  // a flag: takes no value
    const std::string type = option->get_type_name();
    const std::string base = type.substr(0, type.find(':'));
    if (base != "INT" && base != "UINT") continue;
    const bool is_unsigned = base == "UINT";
    option->check(CLI::Validator(
        [is_unsigned](const std::string& text) { return DecimalIntegerError(text, is_unsigned); }, ""));
  }
  for (CLI::App* sub : app.get_subcommands({})) StrictIntegers(*sub);
}

}  // namespace llamad

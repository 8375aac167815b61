// Publishing files durably: a reader sees the old file or the whole new one, also after
// a crash.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace llamad {

// Syncs the finished file `tmp`, renames it over `path` and syncs the folder, which makes
// the rename itself durable.
absl::Status PublishFile(const std::string& tmp, const std::string& path);

// Writes `bytes` to path + ".tmp" and publishes it over `path` (PublishFile).
absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes);

}  // namespace llamad

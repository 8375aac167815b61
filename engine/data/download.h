// Downloads a Hugging Face dataset repository ("owner/name") into a local cache folder,
// resumably and verified: bytes land in <file>.partial and resume with HTTP Range
// requests, a file is renamed to its final name only once its size (and, for LFS files,
// its SHA-256) match the listing, and a manifest of verified files lets later calls
// return without touching the network at all.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace llamad::data {

struct DownloadOptions {
  // Empty: $LLAMAD_HF_ENDPOINT, else https://huggingface.co.
  std::string endpoint;
  // Empty: $LLAMAD_CACHE, else $HOME/.cache/llamad.
  std::string cache_dir;
  std::string revision = "main";
  long connect_timeout_s = 5;
  // A transfer slower than 1 KiB/s for this long is abandoned (and retried).
  long low_speed_time_s = 30;
  // Tries per request on transient failures (connection reset, timeout, 5xx, short
  // transfer); each retry resumes where the last one stopped.
  int max_attempts = 3;
  // Called as bytes of `file` (its path in the repository) arrive; may be empty.
  std::function<void(const std::string& file, uint64_t done, uint64_t total)> progress;
};

// Whether `name` has the form of a hub dataset name: owner/name, each of letters,
// digits, '-', '_' and '.'.
bool IsHubDatasetName(const std::string& name);

// Fetches the files of dataset `name` ("owner/name") for which want(path) is true
// (default: corpus files, IsCorpusFileName of corpus.h) into <cache>/datasets/<owner>/<name>/<revision>/ and returns
// that folder. Errors: InvalidArgument for a bad name or an unsafe listed path;
// NotFound/PermissionDenied when the listing is refused; Unavailable when the endpoint
// cannot be reached (the message says how to use local files instead); DataLoss when a
// file does not match its listed size or SHA-256 (after one retry from zero).
absl::StatusOr<std::string> FetchDataset(
    const std::string& name, const DownloadOptions& options,
    const std::function<bool(const std::string& path)>& want = nullptr);

// Lowercase hex SHA-256 of a file's contents.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace llamad::data

// Reads the documents of a raw corpus: RedPajama-style JSONL (one {"text": ..., "meta":
// {...}} per line), plain text files (one document per file), each plain, .gz or .zst,
// or a folder of them (files in sorted order, recursively).
//
// Bad input is counted and reported with its file and line, and skipped; with `strict`
// the first problem is an error instead. Nothing is dropped silently: every skipped or
// altered document shows in the report.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace llamad::data {

struct CorpusOptions {
  bool strict = false;
  // Longer documents are split into parts of at most this many bytes (at a UTF-8
  // character boundary) and reported.
  size_t max_document_bytes = size_t{64} << 20;
  // JSON Lines longer than this are skipped and reported, unparsed: it bounds what one
  // line (say, a .json file that is a whole JSON array) holds in memory while parsed.
  size_t max_line_bytes = size_t{1} << 30;
};

struct CorpusIssue {
  std::string file;
  uint64_t line = 0;  // 1-based; 0 when the problem is the whole file
  std::string what;
};

struct CorpusReport {
  uint64_t files = 0;
  uint64_t lines = 0;
  uint64_t documents = 0;       // delivered to the callback (split parts count each)
  uint64_t bytes = 0;           // of delivered text
  uint64_t bad_json = 0;        // lines that are not a JSON object with a string "text", or too long
  uint64_t invalid_utf8 = 0;    // documents whose invalid bytes became U+FFFD
  uint64_t empty = 0;           // empty documents (skipped)
  uint64_t split = 0;           // documents longer than max_document_bytes (split)
  uint64_t truncated_files = 0; // compressed streams that end early (tail lost)
  std::vector<CorpusIssue> issues;  // the first kMaxIssues, in reading order
  static constexpr size_t kMaxIssues = 100;

  uint64_t problems() const { return bad_json + invalid_utf8 + empty + split + truncated_files; }
  // One line per issue kind with counts, then the first issues with file and line.
  std::string Summary() const;
};

// The files a corpus path stands for: the path itself, or the corpus files under a
// folder (sorted). Error when there are none.
absl::Status ListCorpusFiles(const std::string& path, std::vector<std::string>* files);

// Calls on_document for each document of `path`, in order.
absl::Status ReadCorpus(const std::string& path, const CorpusOptions& options,
                        CorpusReport* report,
                        const std::function<void(std::string&& text)>& on_document);

// The names of corpus files, for messages.
inline constexpr char kCorpusFileNames[] = ".jsonl, .json or .txt, optionally .gz or .zst";
// Whether a file name is a corpus file (kCorpusFileNames).
bool IsCorpusFileName(const std::string& path);

// Replaces invalid UTF-8 sequences by U+FFFD; returns whether anything changed.
bool RepairUtf8(std::string* text);

}  // namespace llamad::data

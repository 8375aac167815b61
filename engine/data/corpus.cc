#include "data/corpus.h"

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "core/strings.h"

namespace llamad::data {
namespace fs = std::filesystem;

namespace {

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Sequential bytes of a file, decompressing .gz and .zst. Read returns the bytes read
// (0 at the end) or -1 on an error; `truncated` says the compressed stream ended early.
class ByteStream {
 public:
  virtual ~ByteStream() = default;
  virtual long Read(char* buf, size_t n) = 0;
  bool truncated = false;
  std::string error;
};

class GzipStream : public ByteStream {  // also reads plain files (gzip passes them through)
 public:
  explicit GzipStream(const std::string& path) : f_(gzopen(path.c_str(), "rb")) {}
  ~GzipStream() override {
    if (f_) gzclose(f_);
  }
  bool ok() const { return f_ != nullptr; }
  long Read(char* buf, size_t n) override {
    const int got = gzread(f_, buf, unsigned(std::min<size_t>(n, 1 << 30)));
    if (got < 0) {
      int code = 0;
      const char* msg = gzerror(f_, &code);
      if (code == Z_BUF_ERROR) {  // the stream ends inside a compressed block
        truncated = true;
        return 0;
      }
      error = msg != nullptr ? msg : "read error";
      return -1;
    }
    if (got == 0) {
      // zlib reports a stream cut inside a member as Z_BUF_ERROR once the input is spent.
      int code = 0;
      gzerror(f_, &code);
      if (code == Z_BUF_ERROR) truncated = true;
    }
    return got;
  }

 private:
  gzFile f_;
};

class ZstdStream : public ByteStream {
 public:
  explicit ZstdStream(const std::string& path)
      : f_(std::fopen(path.c_str(), "rb")), d_(ZSTD_createDStream()), in_(ZSTD_DStreamInSize()) {
    ZSTD_initDStream(d_);
  }
  ~ZstdStream() override {
    if (f_) std::fclose(f_);
    ZSTD_freeDStream(d_);
  }
  bool ok() const { return f_ != nullptr; }
  long Read(char* buf, size_t n) override {
    ZSTD_outBuffer out{buf, n, 0};
    while (out.pos == 0) {
      if (pos_ == size_) {
        size_ = std::fread(in_.data(), 1, in_.size(), f_);
        pos_ = 0;
        if (size_ == 0) {
          if (std::ferror(f_)) {
            error = "read error";
            return -1;
          }
          // End of file: complete only if the last frame was finished.
          if (last_ != 0) truncated = true;
          return 0;
        }
      }
      ZSTD_inBuffer in{in_.data(), size_, pos_};
      last_ = ZSTD_decompressStream(d_, &out, &in);
      pos_ = in.pos;
      if (ZSTD_isError(last_)) {
        error = ZSTD_getErrorName(last_);
        return -1;
      }
    }
    return long(out.pos);
  }

 private:
  FILE* f_;
  ZSTD_DStream* d_;
  std::vector<char> in_;
  size_t size_ = 0, pos_ = 0, last_ = 0;
};

absl::StatusOr<std::unique_ptr<ByteStream>> OpenStream(const std::string& path) {
  if (EndsWith(path, ".zst")) {
    auto s = std::make_unique<ZstdStream>(path);
    if (!s->ok()) return absl::NotFoundError(StrCat(path, ": cannot open"));
    return std::unique_ptr<ByteStream>(std::move(s));
  }
  auto s = std::make_unique<GzipStream>(path);
  if (!s->ok()) return absl::NotFoundError(StrCat(path, ": cannot open"));
  return std::unique_ptr<ByteStream>(std::move(s));
}

// The format inside any compression: JSONL or plain text.
bool IsJsonl(const std::string& path) {
  std::string p = path;
  for (const char* ext : {".zst", ".gz"}) {
    if (EndsWith(p, ext)) p.resize(p.size() - std::strlen(ext));
  }
  return EndsWith(p, ".jsonl") || EndsWith(p, ".json");
}

}  // namespace

bool IsCorpusFileName(const std::string& path) {
  std::string p = path;
  for (const char* ext : {".zst", ".gz"}) {
    if (EndsWith(p, ext)) p.resize(p.size() - std::strlen(ext));
  }
  return EndsWith(p, ".jsonl") || EndsWith(p, ".json") || EndsWith(p, ".txt");
}

namespace {

class Reader {
 public:
  Reader(const CorpusOptions& options, CorpusReport* report,
         const std::function<void(std::string&&)>& on_document)
      : options_(options), report_(report), on_document_(on_document) {}

  // A problem: an error in strict mode, else counted (by the caller) and noted.
  absl::Status Problem(const std::string& file, uint64_t line, std::string what) {
    if (options_.strict) {
      return absl::InvalidArgumentError(
          line > 0 ? StrCat(file, ":", line, ": ", what, " (--strict)") : StrCat(file, ": ", what, " (--strict)"));
    }
    if (report_->issues.size() < CorpusReport::kMaxIssues) report_->issues.push_back({file, line, std::move(what)});
    return absl::OkStatus();
  }

  // `utf8_checked`: the text came out of the JSON parser, which accepts only valid UTF-8
  // (the line was repaired before parsing), so it needs no second scan.
  absl::Status Document(std::string text, const std::string& file, uint64_t line, bool utf8_checked) {
    if (text.empty()) {
      ++report_->empty;
      return Problem(file, line, "empty document (skipped)");
    }
    if (!utf8_checked && RepairUtf8(&text)) {
      ++report_->invalid_utf8;
      if (auto s = Problem(file, line, "invalid UTF-8 (replaced by U+FFFD)"); !s.ok()) return s;
    }
    if (text.size() > options_.max_document_bytes) {
      ++report_->split;
      if (auto s = Problem(file, line, StrCat("document of ", text.size(), " bytes split into parts of at most ",
                                              options_.max_document_bytes));
          !s.ok()) {
        return s;
      }
      size_t begin = 0;
      while (begin < text.size()) {
        size_t end = std::min(text.size(), begin + options_.max_document_bytes);
        // Back up to a character boundary (never inside a UTF-8 sequence).
        while (end < text.size() && end > begin && (uint8_t(text[end]) & 0xC0) == 0x80) --end;
        if (end == begin) {  // a limit below one character: take the whole character
          end = begin + 1;
          while (end < text.size() && (uint8_t(text[end]) & 0xC0) == 0x80) ++end;
        }
        Deliver(text.substr(begin, end - begin));
        begin = end;
      }
      return absl::OkStatus();
    }
    Deliver(std::move(text));
    return absl::OkStatus();
  }

  absl::Status File(const std::string& path) {
    auto stream = OpenStream(path);
    if (!stream.ok()) return stream.status();
    ++report_->files;
    const bool jsonl = IsJsonl(path);
    std::string pending, text;
    std::vector<char> buf(1 << 20);
    uint64_t line = 0;
    bool skipping = false;  // inside a line longer than max_line_bytes: dropped up to its end
    auto on_line = [&](std::string_view view) -> absl::Status {
      ++line;
      ++report_->lines;
      if (view.size() > options_.max_line_bytes) {
        ++report_->bad_json;
        return Problem(path, line, StrCat("line longer than ", options_.max_line_bytes, " bytes (skipped)"));
      }
      if (view.empty() || view.find_first_not_of(" \t\r") == std::string_view::npos) return absl::OkStatus();
      // The JSON parser rejects invalid UTF-8 in strings: repair the line first, so that a
      // bad byte costs a character, not the document.
      std::string l(view);
      if (RepairUtf8(&l)) {
        ++report_->invalid_utf8;
        if (auto s = Problem(path, line, "invalid UTF-8 (replaced by U+FFFD)"); !s.ok()) return s;
      }
      nlohmann::json j = nlohmann::json::parse(l, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object() || !j.contains("text") || !j["text"].is_string()) {
        ++report_->bad_json;
        return Problem(path, line, j.is_discarded() ? "not valid JSON (skipped)"
                                                    : "no string \"text\" member (skipped)");
      }
      return Document(j["text"].get<std::string>(), path, line, /*utf8_checked=*/true);
    };
    while (true) {
      const long got = (*stream)->Read(buf.data(), buf.size());
      if (got < 0) return absl::DataLossError(StrCat(path, ": ", (*stream)->error));
      if (got == 0) break;
      if (!jsonl) {
        text.append(buf.data(), size_t(got));
        continue;
      }
      const size_t searched = pending.size();  // the tail kept from the last read has no newline
      pending.append(buf.data(), size_t(got));
      size_t start = 0;
      for (size_t nl, from = searched; (nl = pending.find('\n', from)) != std::string::npos; start = from = nl + 1) {
        if (skipping) {  // the end of the over-long line, counted when it was found
          skipping = false;
          continue;
        }
        if (auto s = on_line(std::string_view(pending).substr(start, nl - start)); !s.ok()) return s;
      }
      pending.erase(0, start);
      if (!skipping && pending.size() > options_.max_line_bytes) {
        if (auto s = on_line(pending); !s.ok()) return s;  // counted and reported as too long
        skipping = true;
      }
      if (skipping) pending.clear();  // the dropped line's bytes
    }
    if ((*stream)->truncated) {
      ++report_->truncated_files;
      // The unfinished line is the next, or the over-long one being dropped (counted).
      const uint64_t at = skipping ? line : line + 1;
      if (auto s = Problem(path, at, jsonl ? "compressed stream ends early; the unfinished last line is lost"
                                           : "compressed stream ends early; the document is cut short");
          !s.ok()) {
        return s;
      }
      pending.clear();  // a cut JSON line cannot be parsed
    }
    if (jsonl && !skipping && !pending.empty()) {
      if (auto s = on_line(pending); !s.ok()) return s;
    }
    if (!jsonl) return Document(std::move(text), path, 1, /*utf8_checked=*/false);
    return absl::OkStatus();
  }

 private:
  void Deliver(std::string&& text) {
    ++report_->documents;
    report_->bytes += text.size();
    on_document_(std::move(text));
  }

  const CorpusOptions& options_;
  CorpusReport* report_;
  const std::function<void(std::string&&)>& on_document_;
};

}  // namespace

bool RepairUtf8(std::string* text) {
  const std::string& s = *text;
  size_t i = 0;
  const size_t n = s.size();
  auto valid_at = [&](size_t at, size_t* len) {
    const uint8_t c = uint8_t(s[at]);
    if (c < 0x80) return *len = 1, true;
    int extra;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) extra = 1, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) extra = 2, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) extra = 3, cp = c & 0x07;
    else return false;
    if (at + extra >= n) return false;
    for (int k = 1; k <= extra; ++k) {
      const uint8_t d = uint8_t(s[at + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are invalid.
    static const uint32_t min_cp[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[extra] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return false;
    *len = size_t(extra) + 1;
    return true;
  };
  size_t len = 0;
  while (i < n && valid_at(i, &len)) i += len;
  if (i == n) return false;
  std::string out(s, 0, i);
  while (i < n) {
    if (valid_at(i, &len)) {
      out.append(s, i, len);
      i += len;
    } else {
      out.append("\xEF\xBF\xBD");
      ++i;
    }
  }
  *text = std::move(out);
  return true;
}

std::string CorpusReport::Summary() const {
  std::string out = StrCat(files, " files, ", lines, " lines, ", documents, " documents, ", bytes, " bytes");
  const std::pair<const char*, uint64_t> kinds[] = {{"lines that are not a JSON document", bad_json},
                                                    {"documents with invalid UTF-8 (replaced)", invalid_utf8},
                                                    {"empty documents (skipped)", empty},
                                                    {"documents split for length", split},
                                                    {"truncated compressed files", truncated_files}};
  for (const auto& [what, count] : kinds) {
    if (count > 0) out += StrCat("\n  ", count, " ", what);
  }
  for (const CorpusIssue& i : issues) {
    out += i.line > 0 ? StrCat("\n  ", i.file, ":", i.line, ": ", i.what) : StrCat("\n  ", i.file, ": ", i.what);
  }
  if (problems() > issues.size()) out += StrCat("\n  (", problems() - issues.size(), " more not listed)");
  return out;
}

absl::Status ListCorpusFiles(const std::string& path, std::vector<std::string>* files) {
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    files->push_back(path);
    return absl::OkStatus();
  }
  if (!fs::is_directory(path, ec)) return absl::NotFoundError(StrCat(path, ": no such file or folder"));
  for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    // Hidden files (a download's manifest, partial files) are never corpus text.
    if (it->path().filename().string().starts_with(".")) {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file() && IsCorpusFileName(it->path().string())) files->push_back(it->path().string());
  }
  if (ec) return absl::InternalError(StrCat(path, ": ", ec.message()));
  std::sort(files->begin(), files->end());
  if (files->empty()) {
    return absl::InvalidArgumentError(
        StrCat(path, ": no corpus files (", kCorpusFileNames, ") in this folder"));
  }
  return absl::OkStatus();
}

absl::Status ReadCorpus(const std::string& path, const CorpusOptions& options, CorpusReport* report,
                        const std::function<void(std::string&& text)>& on_document) {
  std::vector<std::string> files;
  if (auto s = ListCorpusFiles(path, &files); !s.ok()) return s;
  Reader reader(options, report, on_document);
  for (const std::string& f : files) {
    if (auto s = reader.File(f); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace llamad::data

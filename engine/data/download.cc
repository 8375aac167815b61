#include "data/download.h"
#include "data/corpus.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "storage/files.h"

namespace llamad::data {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kManifest[] = ".llamad-complete.json";
constexpr char kLock[] = ".llamad-lock";
constexpr char kHint[] =
    "pass -d PATH to use local files, or -d sample for the bundled sample corpus";

struct ListedFile {
  std::string path;
  uint64_t size = 0;
  std::string oid;     // git blob id: changes whenever the content does
  std::string sha256;  // lfs.oid; empty for files stored in git itself
};

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

std::string Errno(const std::string& what) {
  return fmt::format("{}: {}", what, std::strerror(errno));
}

// One owner or name part: letters, digits, '-', '_', '.', and not "." or "..".
bool SafeName(std::string_view s) {
  if (s.empty() || s == "." || s == "..") return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

// Relative, without empty, "." or ".." parts: whatever a listing says, nothing may be
// written outside the dataset folder.
bool SafeRelativePath(const std::string& p) {
  if (p.empty() || p[0] == '/' || p.find('\0') != std::string::npos) return false;
  for (size_t start = 0;;) {
    const size_t slash = p.find('/', start);
    const std::string_view part(p.data() + start,
                                (slash == std::string::npos ? p.size() : slash) - start);
    if (part.empty() || part == "." || part == "..") return false;
    if (slash == std::string::npos) return true;
    start = slash + 1;
  }
}

bool IsHex(const std::string& s, size_t n) {
  return s.size() == n && std::all_of(s.begin(), s.end(), [](char c) {
           return std::isxdigit(static_cast<unsigned char>(c));
         });
}

// SHA-256 of a file and, when `git_oid` is wanted, its git blob id (SHA-1 of
// "blob <size>\0" + content), which is how the listing identifies non-LFS files.
absl::Status HashFile(const std::string& path, std::string* sha256, std::string* git_oid) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) != 0) {
    const absl::Status s = absl::InternalError(Errno("cannot read " + path));
    if (fd >= 0) close(fd);
    return s;
  }
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> a(EVP_MD_CTX_new(), EVP_MD_CTX_free),
      b(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(a.get(), EVP_sha256(), nullptr);
  EVP_DigestInit_ex(b.get(), EVP_sha1(), nullptr);
  const std::string header = fmt::format("blob {}", st.st_size);
  EVP_DigestUpdate(b.get(), header.c_str(), header.size() + 1);  // with the '\0'
  std::vector<char> buf(1 << 20);
  ssize_t n;
  while ((n = read(fd, buf.data(), buf.size())) != 0) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      return absl::InternalError(Errno("cannot read " + path));
    }
    EVP_DigestUpdate(a.get(), buf.data(), size_t(n));
    if (git_oid) EVP_DigestUpdate(b.get(), buf.data(), size_t(n));
  }
  close(fd);
  auto hex = [](EVP_MD_CTX* ctx) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, md, &len);
    std::string out;
    for (unsigned i = 0; i < len; ++i) out += fmt::format("{:02x}", md[i]);
    return out;
  };
  *sha256 = hex(a.get());
  if (git_oid) *git_oid = hex(b.get());
  return absl::OkStatus();
}

// ---- HTTP -------------------------------------------------------------------------

// One HTTP exchange. Status and headers are the last response's (redirects replace
// them). The body of a 200/206 goes into `fd` after the `offset` bytes already there;
// any other body is kept in `body` (error pages, the listing).
struct Exchange {
  int fd = -1;
  uint64_t offset = 0;
  uint64_t received = 0;
  long status = 0;
  bool decided = false, to_file = false, restart = false;
  std::string body, content_range, link, error;
  char curl_error[CURL_ERROR_SIZE] = {};
  const DownloadOptions* options = nullptr;
  std::string file;
  uint64_t total = 0;
};

size_t OnHeader(char* data, size_t size, size_t n, void* user) {
  auto* x = static_cast<Exchange*>(user);
  const std::string_view line(data, size * n);
  if (line.starts_with("HTTP/")) {  // a new response (e.g. after a redirect)
    const size_t sp = line.find(' ');
    x->status =
        sp == std::string_view::npos ? 0 : std::atol(std::string(line.substr(sp + 1, 3)).c_str());
    x->decided = false;
    x->body.clear(), x->content_range.clear(), x->link.clear();
  } else if (const size_t colon = line.find(':'); colon != std::string_view::npos) {
    std::string key(line.substr(0, colon));
    std::transform(key.begin(), key.end(), key.begin(),
                   [](unsigned char c) { return std::tolower(c); });
    std::string value(line.substr(colon + 1));
    value.erase(0, value.find_first_not_of(" \t"));
    value.erase(value.find_last_not_of(" \t\r\n") + 1);
    if (key == "content-range") x->content_range = value;
    if (key == "link") x->link = value;
  }
  return size * n;
}

size_t OnBody(char* data, size_t size, size_t n, void* user) {
  auto* x = static_cast<Exchange*>(user);
  const size_t len = size * n;
  if (!x->decided) {  // the first body bytes of this response
    x->decided = true;
    x->to_file = x->fd >= 0 && (x->status == 200 || x->status == 206);
    unsigned long long start = 0;
    if (x->to_file && x->status == 206 &&
        (std::sscanf(x->content_range.c_str(), "bytes %llu-", &start) != 1 || start != x->offset)) {
      x->error = fmt::format("the server sent range '{}' for a request from byte {}",
                             x->content_range, x->offset);
      x->restart = true;
      return 0;
    }
    if (x->to_file && x->status == 200 && x->offset > 0) {
      // The server ignored Range and sends the whole file: start the partial over.
      if (ftruncate(x->fd, 0) != 0) {
        x->error = Errno("cannot truncate " + x->file + ".partial");
        return 0;
      }
      x->offset = 0;
    }
  }
  if (!x->to_file) {
    if (x->fd < 0 || x->body.size() < 4096) x->body.append(data, len);  // error pages: a prefix
    return len;
  }
  for (size_t done = 0; done < len;) {
    const ssize_t w = pwrite(x->fd, data + done, len - done, off_t(x->offset + x->received + done));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      x->error = Errno("cannot write " + x->file + ".partial");
      return 0;
    }
    done += size_t(w);
  }
  x->received += len;
  if (x->options->progress) x->options->progress(x->file, x->offset + x->received, x->total);
  return len;
}

struct CurlFree {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
using Curl = std::unique_ptr<CURL, CurlFree>;

// curl_global_init is not thread-safe; curl_easy_init would call it implicitly.
Curl EasyInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  return Curl(curl_easy_init());
}

Curl NewHandle(const std::string& url, const DownloadOptions& o, Exchange* x) {
  Curl c = EasyInit();
  CURL* h = c.get();
  x->options = &o;
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);  // resolve/ redirects LFS files to a CDN
  curl_easy_setopt(h, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(h, CURLOPT_FAILONERROR, 0L);  // statuses are classified below
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, o.connect_timeout_s);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);  // a stalled transfer is retried
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, o.low_speed_time_s);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "llamad/0.1");
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);  // no SIGALRM for DNS timeouts in threaded callers
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, x->curl_error);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, x);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, x);
  return c;
}

std::string CurlMessage(CURLcode rc, const Exchange& x) {
  return x.curl_error[0] ? fmt::format("{} ({})", x.curl_error, curl_easy_strerror(rc))
                         : curl_easy_strerror(rc);
}

// Failures that another try may not repeat.
bool Transient(CURLcode rc) {
  switch (rc) {
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_GOT_NOTHING:
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}
bool Transient(long status) { return status == 408 || status == 429 || status >= 500; }

void Backoff(int attempt) {
  std::this_thread::sleep_for(
      std::chrono::milliseconds(std::min(250 << std::min(attempt - 1, 4), 4000)));
}

absl::Status Refused(const std::string& what, const std::string& url, long status) {
  const std::string msg = fmt::format("{} at {}: HTTP {}", what, url, status);
  if (status == 401 || status == 404)  // the Hub answers 401 for repos that do not exist
    return absl::NotFoundError(fmt::format("{} (not found, or private); {}", msg, kHint));
  if (status == 403)
    return absl::PermissionDeniedError(fmt::format("{} (gated or forbidden); {}", msg, kHint));
  return absl::UnavailableError(msg);
}

// One page of the listing. A connection that never came up is not retried: without a
// network the caller hears so within connect_timeout_s, not after several tries.
absl::StatusOr<Exchange> GetPage(const std::string& url, const std::string& dataset,
                                 const DownloadOptions& o) {
  absl::Status last;
  for (int attempt = 1;; ++attempt) {
    auto x = std::make_unique<Exchange>();
    Curl h = NewHandle(url, o, x.get());
    curl_easy_setopt(h.get(), CURLOPT_ACCEPT_ENCODING, "");  // listings compress well
    const CURLcode rc = curl_easy_perform(h.get());
    if (rc != CURLE_OK) {
      curl_off_t connect_us = 0;
      curl_easy_getinfo(h.get(), CURLINFO_CONNECT_TIME_T, &connect_us);
      last = absl::UnavailableError(fmt::format("could not fetch dataset {} from {}: {}; {}",
                                                dataset, url, CurlMessage(rc, *x), kHint));
      if (!Transient(rc) || connect_us == 0) return last;
    } else if (x->status == 200) {
      return std::move(*x);
    } else if (!Transient(x->status)) {
      return Refused("listing of dataset " + dataset, url, x->status);
    } else {
      last = absl::UnavailableError(fmt::format("could not fetch dataset {} from {}: HTTP {}; {}",
                                                dataset, url, x->status, kHint));
    }
    if (attempt >= o.max_attempts) return last;
    Backoff(attempt);
  }
}

// The Link header's rel="next" target (the Hub pages long listings with a cursor).
std::string NextLink(const std::string& link, const std::string& endpoint) {
  for (size_t pos = 0; (pos = link.find('<', pos)) != std::string::npos;) {
    const size_t end = link.find('>', pos);
    if (end == std::string::npos) break;
    const std::string params = link.substr(end + 1, link.find('<', end) - end - 1);
    if (params.find("rel=\"next\"") != std::string::npos ||
        params.find("rel=next") != std::string::npos) {
      std::string url = link.substr(pos + 1, end - pos - 1);
      if (url.starts_with("/")) {  // relative: keep the endpoint's scheme and host
        const size_t host = endpoint.find("://");
        url =
            endpoint.substr(0, endpoint.find('/', host == std::string::npos ? 0 : host + 3)) + url;
      }
      return url;
    }
    pos = end;
  }
  return "";
}

absl::StatusOr<std::vector<ListedFile>> ListFiles(const std::string& endpoint,
                                                  const std::string& dataset,
                                                  const std::string& revision,
                                                  const DownloadOptions& o) {
  std::vector<ListedFile> files;
  std::string url =
      fmt::format("{}/api/datasets/{}/tree/{}?recursive=true", endpoint, dataset, revision);
  std::set<std::string> read;  // pages that link back to one already read would never end
  while (!url.empty()) {
    if (!read.insert(url).second) {
      return absl::UnavailableError(
          fmt::format("the listing's pages link back to {}, a page already read", url));
    }
    auto page = GetPage(url, dataset, o);
    if (!page.ok()) return page.status();
    const json j = json::parse(page->body, nullptr, /*allow_exceptions=*/false);
    if (!j.is_array())
      return absl::UnavailableError(fmt::format("the listing from {} is not a JSON array", url));
    for (const json& e : j) {
      if (!e.is_object() || e.value("type", json()) != "file") continue;
      ListedFile f;
      const json path = e.value("path", json()), size = e.value("size", json()),
                 oid = e.value("oid", json());
      if (!path.is_string() || !size.is_number_unsigned())
        return absl::UnavailableError(
            fmt::format("the listing from {} has a malformed entry: {}", url, e.dump()));
      f.path = path.get<std::string>();
      f.size = size.get<uint64_t>();
      if (oid.is_string()) f.oid = oid.get<std::string>();
      if (const json lfs = e.value("lfs", json());
          lfs.is_object() && lfs.value("oid", json()).is_string()) {
        f.sha256 = lfs["oid"].get<std::string>();
        if (f.sha256.starts_with("sha256:")) f.sha256.erase(0, 7);
        std::transform(f.sha256.begin(), f.sha256.end(), f.sha256.begin(),
                       [](unsigned char c) { return std::tolower(c); });
      }
      if (!SafeRelativePath(f.path) || f.path.starts_with(".llamad-"))
        return absl::InvalidArgumentError(
            fmt::format("the listing from {} has an unsafe path '{}'", url, f.path));
      files.push_back(std::move(f));
    }
    url = NextLink(page->link, endpoint);
  }
  return files;
}

// ---- One file ----------------------------------------------------------------------

enum class Outcome { kComplete, kRetry, kFail };

// One try at bringing `partial` up to the listed size, resuming from what it holds.
Outcome TransferOnce(const std::string& url, const fs::path& partial, const ListedFile& f,
                     const DownloadOptions& o, absl::Status* error) {
  const int fd = open(partial.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) != 0) {
    *error = absl::InternalError(Errno("cannot open " + partial.string()));
    if (fd >= 0) close(fd);
    return Outcome::kFail;
  }
  uint64_t have = uint64_t(st.st_size);
  if (have > f.size && ftruncate(fd, 0) == 0) have = 0;  // too long to be a prefix
  if (have == f.size) {
    close(fd);
    return Outcome::kComplete;
  }
  Exchange x;
  x.fd = fd, x.offset = have, x.file = f.path, x.total = f.size;
  Curl h = NewHandle(url, o, &x);
  const std::string range = fmt::format("{}-", have);
  if (have > 0) curl_easy_setopt(h.get(), CURLOPT_RANGE, range.c_str());
  const CURLcode rc = curl_easy_perform(h.get());
  close(fd);
  const uint64_t now = x.offset + x.received;
  if (!x.error.empty()) {
    if (!x.restart) {
      *error = absl::InternalError(x.error);
      return Outcome::kFail;
    }
    *error = absl::UnavailableError(fmt::format("{}: {}", url, x.error));
    truncate(partial.c_str(), 0);
    return Outcome::kRetry;
  }
  if (rc != CURLE_OK) {
    *error = absl::UnavailableError(
        fmt::format("{}: {} ({} of {} bytes)", url, CurlMessage(rc, x), now, f.size));
    return Transient(rc) ? Outcome::kRetry : Outcome::kFail;
  }
  if (x.status == 200 || x.status == 206) {
    if (now >= f.size) return Outcome::kComplete;  // longer than listed: verification says so
    *error = absl::UnavailableError(
        fmt::format("{}: short transfer ({} of {} bytes)", url, now, f.size));
    return Outcome::kRetry;
  }
  if (x.status == 416) {  // the partial is not a prefix of what the server has
    truncate(partial.c_str(), 0);
    *error = absl::UnavailableError(fmt::format("{}: HTTP 416 for range {}", url, range));
    return Outcome::kRetry;
  }
  *error = Refused("file " + f.path, url, x.status);
  return Transient(x.status) ? Outcome::kRetry : Outcome::kFail;
}

// Downloads, verifies and publishes one file; returns its SHA-256.
absl::StatusOr<std::string> DownloadFile(const std::string& url, const fs::path& dest,
                                         const ListedFile& f, const std::string& dataset,
                                         const DownloadOptions& o) {
  const fs::path partial = dest.string() + ".partial";
  if (auto s = storage::CreateFolders(dest.parent_path().string()); !s.ok()) return s;
  std::error_code ec;
  bool restarted = false;
  for (int attempt = 1;;) {
    absl::Status error;
    const Outcome outcome = TransferOnce(url, partial, f, o, &error);
    if (outcome == Outcome::kFail) return error;
    if (outcome == Outcome::kRetry) {
      if (attempt >= o.max_attempts)
        return absl::UnavailableError(fmt::format(
            "could not fetch dataset {}: {} (after {} attempts; a later run resumes); {}", dataset,
            std::string(error.message()), attempt, kHint));
      Backoff(attempt++);
      continue;
    }
    const bool check_git = f.sha256.empty() && IsHex(f.oid, 40);
    std::string sha, git;
    if (absl::Status s = HashFile(partial, &sha, check_git ? &git : nullptr); !s.ok()) return s;
    const uint64_t size = fs::file_size(partial, ec);
    std::string expected, actual;
    if (size != f.size)
      expected = fmt::format("{} bytes", f.size), actual = fmt::format("{} bytes", size);
    else if (!f.sha256.empty() && sha != f.sha256)
      expected = "sha256 " + f.sha256, actual = "sha256 " + sha;
    else if (check_git && git != f.oid)
      expected = "git oid " + f.oid, actual = "git oid " + git;
    if (!expected.empty()) {
      // A bad partial (e.g. from an older revision) gets one fresh start; a second
      // mismatch means the server sends something else than its listing says.
      fs::remove(partial, ec);
      if (!restarted) {
        restarted = true, attempt = 1;
        continue;
      }
      return absl::DataLossError(
          fmt::format("dataset {}: file {} from {} does not match the listing: expected {}, got {}",
                      dataset, f.path, url, expected, actual));
    }
    // The data and its rename reach the disk before the manifest says the file is complete.
    if (auto s = storage::PublishFile(partial.string(), dest.string()); !s.ok()) return s;
    return sha;
  }
}

// ---- Manifest ----------------------------------------------------------------------

// The whole listing (so that `want` can be applied without the network) and the
// verified files.
struct Manifest {
  std::vector<ListedFile> listing;
  std::map<std::string, ListedFile> verified;
};

json ToJson(const ListedFile& f) {
  return {{"path", f.path}, {"size", f.size}, {"oid", f.oid}, {"sha256", f.sha256}};
}
ListedFile FromJson(const json& j) {
  return {j.at("path").get<std::string>(), j.at("size").get<uint64_t>(),
          j.at("oid").get<std::string>(), j.at("sha256").get<std::string>()};
}

Manifest ReadManifest(const fs::path& folder) {
  Manifest m;
  std::ifstream in(folder / kManifest);
  if (!in) return m;
  try {
    const json j = json::parse(in);
    for (const json& e : j.at("listing")) m.listing.push_back(FromJson(e));
    for (const json& e : j.at("verified"))
      m.verified[e.at("path").get<std::string>()] = FromJson(e);
  } catch (const json::exception&) {
    return {};  // unreadable: treated as absent (files are verified again)
  }
  return m;
}

absl::Status WriteManifest(const fs::path& folder, const std::string& dataset, const Manifest& m) {
  json j = {{"dataset", dataset}, {"listing", json::array()}, {"verified", json::array()}};
  for (const auto& f : m.listing) j["listing"].push_back(ToJson(f));
  for (const auto& [path, f] : m.verified) j["verified"].push_back(ToJson(f));
  return storage::WriteFileAtomically((folder / kManifest).string(), j.dump(1) + "\n");
}

// True when every wanted file of the recorded listing is verified and on disk.
bool Complete(const fs::path& folder, const Manifest& m,
              const std::function<bool(const std::string&)>& want) {
  int wanted = 0;
  for (const ListedFile& f : m.listing) {
    if (!want(f.path)) continue;
    ++wanted;
    const auto it = m.verified.find(f.path);
    std::error_code ec;
    if (it == m.verified.end() || it->second.size != f.size ||
        fs::file_size(folder / f.path, ec) != f.size || ec)
      return false;
  }
  return wanted > 0;
}

}  // namespace

bool IsHubDatasetName(const std::string& name) {
  const size_t slash = name.find('/');
  return slash != std::string::npos && SafeName(name.substr(0, slash)) && SafeName(name.substr(slash + 1));
}

absl::StatusOr<std::string> Sha256File(const std::string& path) {
  std::string sha;
  if (absl::Status s = HashFile(path, &sha, nullptr); !s.ok()) return s;
  return sha;
}

absl::StatusOr<std::string> FetchDataset(
    const std::string& name, const DownloadOptions& options,
    const std::function<bool(const std::string& path)>& want_arg) {
  if (!IsHubDatasetName(name))
    return absl::InvalidArgumentError(fmt::format(
        "invalid dataset name '{}': expected owner/name (letters, digits, '-', '_', '.')", name));
  // Revisions are branch names, tags or commits; "refs/convert/parquet" has slashes.
  if (!SafeRelativePath(options.revision) ||
      !std::all_of(options.revision.begin(), options.revision.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ||
               c == '/';
      }))
    return absl::InvalidArgumentError(fmt::format("invalid revision '{}'", options.revision));
  DownloadOptions o = options;
  o.max_attempts = std::max(o.max_attempts, 1);
  std::string endpoint = !o.endpoint.empty() ? o.endpoint : Env("LLAMAD_HF_ENDPOINT");
  if (endpoint.empty()) endpoint = "https://huggingface.co";
  while (endpoint.ends_with("/")) endpoint.pop_back();
  std::string cache = !o.cache_dir.empty() ? o.cache_dir : Env("LLAMAD_CACHE");
  if (cache.empty() && !Env("HOME").empty()) cache = Env("HOME") + "/.cache/llamad";
  if (cache.empty())
    return absl::FailedPreconditionError("no cache folder: set LLAMAD_CACHE or HOME");
  const auto want = want_arg ? want_arg : std::function<bool(const std::string&)>(IsCorpusFileName);
  const fs::path folder = fs::path(cache) / "datasets" / name / o.revision;

  // Complete already: no network at all, not even the listing.
  Manifest m = ReadManifest(folder);
  if (Complete(folder, m, want)) return folder.string();

  if (auto s = storage::CreateFolders(folder.string()); !s.ok()) return s;
  std::error_code ec;
  // One downloader per folder: a second process waits, then finds the work done.
  auto lock = storage::FileLock::Acquire((folder / kLock).string());
  if (!lock.ok()) return lock.status();
  m = ReadManifest(folder);
  if (Complete(folder, m, want)) return folder.string();

  // URLs carry the revision and paths escaped ("refs/convert/parquet" is one segment).
  Curl esc = EasyInit();
  auto escape = [&](const std::string& s) {
    char* e = curl_easy_escape(esc.get(), s.data(), int(s.size()));
    std::string out(e);
    curl_free(e);
    return out;
  };
  auto listed = ListFiles(endpoint, name, escape(o.revision), o);
  if (!listed.ok()) return listed.status();
  m.listing = *listed;
  std::vector<ListedFile> wanted;
  for (const ListedFile& f : m.listing)
    if (want(f.path)) wanted.push_back(f);
  if (wanted.empty()) {
    std::string some;
    for (size_t i = 0; i < m.listing.size() && i < 10; ++i)
      some += (i ? ", " : "") + m.listing[i].path;
    return absl::NotFoundError(
        fmt::format("dataset {} (revision {}) has no files to fetch among {} listed: {}", name,
                    o.revision, m.listing.size(), some.empty() ? "none" : some));
  }
  std::sort(wanted.begin(), wanted.end(),
            [](const auto& a, const auto& b) { return a.path < b.path; });
  // The manifest holds the whole listing, so rewriting it after each of thousands of
  // small files would cost more than the files. Every few seconds is enough: a file
  // published but not recorded is hashed again (LFS) or fetched again (small) next time.
  auto last_write = std::chrono::steady_clock::now();
  bool unwritten = true;  // the listing itself may be new
  auto write_manifest = [&](bool force) {
    const auto now = std::chrono::steady_clock::now();
    if (!unwritten || (!force && now - last_write < std::chrono::seconds(2)))
      return absl::OkStatus();
    last_write = now, unwritten = false;
    return WriteManifest(folder, name, m);
  };
  for (const ListedFile& f : wanted) {
    const fs::path dest = folder / f.path;
    const auto it = m.verified.find(f.path);
    const bool same = it != m.verified.end() && it->second.size == f.size &&
                      it->second.oid == f.oid &&
                      (f.sha256.empty() || it->second.sha256 == f.sha256);
    if (same && fs::file_size(dest, ec) == f.size && !ec) continue;
    std::string sha;
    if (!same && !f.sha256.empty() && fs::file_size(dest, ec) == f.size && !ec &&
        HashFile(dest.string(), &sha, nullptr).ok() && sha == f.sha256) {
      // Published but not yet recorded (e.g. interrupted before the manifest write).
    } else {
      std::string url =
          fmt::format("{}/datasets/{}/resolve/{}", endpoint, name, escape(o.revision));
      for (size_t start = 0, end; start <= f.path.size(); start = end + 1) {
        end = std::min(f.path.find('/', start), f.path.size());
        url += "/" + escape(f.path.substr(start, end - start));
      }
      auto got = DownloadFile(url, dest, f, name, o);
      if (!got.ok()) {
        write_manifest(true).IgnoreError();  // keep what was verified so far
        return got.status();
      }
      sha = *got;
    }
    ListedFile done = f;
    done.sha256 = sha;  // computed locally, also for non-LFS files
    m.verified[f.path] = done;
    unwritten = true;
    if (absl::Status s = write_manifest(false); !s.ok()) return s;
  }
  if (absl::Status s = write_manifest(true); !s.ok()) return s;
  return folder.string();
}

}  // namespace llamad::data

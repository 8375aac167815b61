#include "storage/safetensors.h"

#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "storage/files.h"

namespace llamad::storage {
namespace fs = std::filesystem;
namespace {

size_t DTypeBytes(const std::string& dtype) {
  if (dtype == "F32") return 4;
  if (dtype == "F16" || dtype == "BF16") return 2;
  return 0;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400) == 0) mantissa <<= 1, --exponent;
      bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

absl::StatusOr<std::vector<SafetensorsEntry>> ReadHeader(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(path + ": cannot open safetensors file");
  const uint64_t file_size = uint64_t(in.tellg());
  in.seekg(0);
  uint64_t header_size = 0;
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(&header_size), 8) ||
      header_size > file_size - 8 || header_size > (uint64_t{100} << 20)) {
    return absl::InvalidArgumentError(path + ": not a safetensors file (bad header length)");
  }
  std::string header(header_size, '\0');
  if (!in.read(header.data(), std::streamsize(header_size))) {
    return absl::InvalidArgumentError(path + ": truncated safetensors header");
  }
  const uint64_t data_start = 8 + header_size;
  std::vector<SafetensorsEntry> out;
  try {
    const auto j = nlohmann::json::parse(header);
    if (!j.is_object()) return absl::InvalidArgumentError(path + ": the safetensors header is not a JSON object");
    // Sizes must be integers: a float would be cut to one (or, past the type's range, undefined).
    auto integers = [](const std::string& name, const nlohmann::json& v, const char* key) -> const nlohmann::json& {
      const nlohmann::json& list = v.at(key);
      for (const auto& x : list) {
        if (!x.is_number_integer()) {
          throw std::invalid_argument(fmt::format("tensor '{}': {} holds {}, not an integer", name, key, x.dump()));
        }
      }
      return list;
    };
    for (const auto& [name, v] : j.items()) {
      if (name == "__metadata__") continue;
      SafetensorsEntry e;
      e.name = name;
      e.dtype = v.at("dtype").get<std::string>();
      e.shape = integers(name, v, "shape").get<std::vector<int64_t>>();
      const auto offsets = integers(name, v, "data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] > file_size - data_start) {
        return absl::InvalidArgumentError(fmt::format("{}: tensor '{}' has data offsets outside the file", path, name));
      }
      uint64_t numel = 1;
      for (int64_t d : e.shape) {
        if (d < 0 || (d > 0 && numel > (uint64_t{1} << 48) / uint64_t(d))) {
          return absl::InvalidArgumentError(fmt::format("{}: tensor '{}' has an invalid shape", path, name));
        }
        numel *= uint64_t(d);
      }
      e.file = path;
      e.begin = offsets[0];
      e.end = offsets[1];
      e.data_start = data_start;
      const size_t bytes = DTypeBytes(e.dtype);
      if (bytes != 0 && e.numel() * bytes != e.end - e.begin) {
        return absl::InvalidArgumentError(fmt::format("{}: tensor '{}': {} bytes do not match shape and dtype {}",
                                                      path, name, e.end - e.begin, e.dtype));
      }
      out.push_back(std::move(e));
    }
  } catch (const std::exception& ex) {
    return absl::InvalidArgumentError(fmt::format("{}: unreadable safetensors header: {}", path, ex.what()));
  }
  return out;
}

}  // namespace

uint64_t SafetensorsEntry::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= uint64_t(d);
  return n;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= uint64_t(d);
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * numel}}};
    offset += 4 * numel;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    const uint64_t size = text.size();
    out.write(reinterpret_cast<const char*>(&size), 8);
    out.write(text.data(), std::streamsize(text.size()));
    for (const TensorToWrite& t : tensors) {
      uint64_t numel = 1;
      for (int64_t d : t.shape) numel *= uint64_t(d);
      out.write(reinterpret_cast<const char*>(t.data), std::streamsize(4 * numel));
    }
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      fs::remove(tmp, ec);  // a model-sized partial file
      return absl::InternalError(tmp + ": write failed");
    }
  }
  return PublishFile(tmp, path);
}

absl::StatusOr<std::map<std::string, SafetensorsEntry>> ListSafetensors(const std::string& path_or_dir) {
  std::vector<std::string> files;
  std::error_code ec;  // a path that cannot be looked at is reported when it is opened
  if (fs::is_directory(path_or_dir, ec)) {
    const fs::path dir(path_or_dir);
    if (fs::exists(dir / "model.safetensors", ec)) {
      files.push_back((dir / "model.safetensors").string());
    } else if (fs::exists(dir / "model.safetensors.index.json", ec)) {
      const std::string index_path = (dir / "model.safetensors.index.json").string();
      try {
        std::ifstream in(index_path);
        const auto j = nlohmann::json::parse(in);
        std::set<std::string> unique;
        for (const auto& [name, file] : j.at("weight_map").items()) {
          const std::string f = file.get<std::string>();
          if (f.empty() || f.find('/') != std::string::npos || f == "..") {
            return absl::InvalidArgumentError(fmt::format("{}: weight_map names '{}', not a file in this folder",
                                                          index_path, f));
          }
          unique.insert(f);
        }
        for (const auto& f : unique) files.push_back((dir / f).string());
      } catch (const std::exception& e) {
        return absl::InvalidArgumentError(fmt::format("{}: unreadable: {}", index_path, e.what()));
      }
    } else {
      return absl::NotFoundError(fmt::format(
          "{}: no model.safetensors or model.safetensors.index.json in this folder", path_or_dir));
    }
  } else {
    files.push_back(path_or_dir);
  }
  std::map<std::string, SafetensorsEntry> out;
  for (const std::string& f : files) {
    auto entries = ReadHeader(f);
    if (!entries.ok()) return entries.status();
    for (auto& e : *entries) {
      if (out.count(e.name)) {
        return absl::InvalidArgumentError(fmt::format("{}: tensor '{}' also appears in {}", f, e.name, out[e.name].file));
      }
      out[e.name] = std::move(e);
    }
  }
  return out;
}

absl::Status ReadAsFloat32(const SafetensorsEntry& e, float* out) { return ReadAsFloat32(e, 0, e.numel(), out); }

absl::Status ReadAsFloat32(const SafetensorsEntry& e, uint64_t first, uint64_t last, float* out) {
  const size_t bytes = DTypeBytes(e.dtype);
  if (bytes == 0) {
    return absl::InvalidArgumentError(fmt::format("{}: tensor '{}' has dtype {}; F32, F16 and BF16 are supported",
                                                  e.file, e.name, e.dtype));
  }
  if (first > last || last > e.numel()) {
    return absl::InvalidArgumentError(
        fmt::format("{}: tensor '{}' has {} elements, not [{}, {})", e.file, e.name, e.numel(), first, last));
  }
  std::ifstream in(e.file, std::ios::binary);
  in.seekg(std::streamoff(e.data_start + e.begin + first * bytes));
  const uint64_t n = last - first;
  if (e.dtype == "F32") {
    in.read(reinterpret_cast<char*>(out), std::streamsize(4 * n));
  } else {
    std::vector<uint16_t> half(n);
    in.read(reinterpret_cast<char*>(half.data()), std::streamsize(2 * n));
    for (uint64_t i = 0; i < n; ++i) {
      if (e.dtype == "BF16") {
        const uint32_t bits = uint32_t(half[i]) << 16;
        std::memcpy(&out[i], &bits, 4);
      } else {
        out[i] = HalfToFloat(half[i]);
      }
    }
  }
  if (!in) return absl::DataLossError(fmt::format("{}: tensor '{}': read failed", e.file, e.name));
  return absl::OkStatus();
}

}  // namespace llamad::storage

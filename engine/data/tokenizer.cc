#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <thread>
#include <unordered_map>

namespace llamad::data {
namespace {

int ThreadsOrAllCores(int threads) {
  return threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::Load(const std::string& path, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = path + ": cannot open the tokenizer model";
    return nullptr;
  }
  std::stringstream bytes;
  bytes << in.rdbuf();
  auto t = FromSerialized(bytes.str(), error);
  if (!t) *error = path + ": " + *error;
  return t;
}

std::unique_ptr<Tokenizer> Tokenizer::FromSerialized(std::string_view model, std::string* error) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  const auto status = t->sp_->LoadFromSerializedProto(model);
  if (!status.ok()) {
    *error = "not a SentencePiece model (" + std::string(status.message()) + ")";
    return nullptr;
  }
  t->serialized_ = std::string(model);
  return t;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int> ids;
  // Encoding fails only for a model that failed to load, which Load rules out.
  sp_->Encode(text, &ids).IgnoreError();
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text;
  sp_->Decode(std::vector<int>(ids.begin(), ids.end()), &text).IgnoreError();
  return text;
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::unk_id() const { return sp_->unk_id(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
// SentencePiece indexes its pieces without a range check, and a model may have no BOS
// (id -1): ids outside the model have no piece.
std::string Tokenizer::IdToPiece(int id) const { return id >= 0 && id < vocab_size() ? sp_->IdToPiece(id) : ""; }
bool Tokenizer::IsByte(int id) const { return id >= 0 && id < vocab_size() && sp_->IsByte(id); }

namespace {

class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::function<bool(std::string*)>& next) : next_(next) { Next(); }
  bool done() const override { return done_; }
  void Next() override { done_ = !next_(&line_); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::function<bool(std::string*)>& next_;
  std::string line_;
  bool done_ = false;
};

}  // namespace

std::string TrainTokenizer(const TokenizerTrainOptions& o,
                           const std::function<bool(std::string* line)>& next_line) {
  // SentencePiece's trainer takes 1 to 128 threads; a larger machine trains on 128.
  const int threads = std::min(ThreadsOrAllCores(o.threads), kMaxTokenizerTrainThreads);
  // LLaMA's tokenizer settings: BPE with byte fallback (no unknown bytes), digits split,
  // no normalisation and whitespace kept as is. A map, not SentencePiece's "--k=v ..."
  // text, so that a prefix with spaces stays one value.
  const std::unordered_map<std::string, std::string> args = {
      {"model_prefix", o.model_prefix},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"model_type", "bpe"},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"character_coverage", "0.99995"},
      {"num_threads", std::to_string(threads)},
      {"input_sentence_size", std::to_string(o.input_sentence_size)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", std::to_string(o.max_sentence_length)},
      {"minloglevel", "1"}};
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(o.seed));  // the line sample
  LineIterator lines(next_line);
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines);
  if (!status.ok()) return std::string(status.message());
  return "";
}

std::vector<std::vector<int32_t>> EncodeAll(const Tokenizer& tokenizer, const std::vector<std::string>& texts,
                                            int threads) {
  std::vector<std::vector<int32_t>> ids(texts.size());
  // A static split, no larger than the work.
  const size_t n = std::min<size_t>(size_t(ThreadsOrAllCores(threads)), std::max<size_t>(1, texts.size()));
  std::vector<std::thread> pool;
  for (size_t t = 0; t < n; ++t) {
    pool.emplace_back([&, t] {
      for (size_t i = t; i < texts.size(); i += n) ids[i] = tokenizer.Encode(texts[i]);
    });
  }
  for (auto& th : pool) th.join();
  return ids;
}

}  // namespace llamad::data

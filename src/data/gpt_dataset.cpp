// Megatron's train/valid/test split and GPT sample construction (gpt_dataset.py:
// _build_document_index, helpers.cpp build_sample_idx, _build_shuffle_index). What differs from
// Megatron (the RNG, per-epoch document shuffles, documents as the unit) is listed in data.h.
#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "moecore/data.h"
#include "moecore/error.h"

namespace moe {

namespace {

// Python's round(): to nearest, ties to even (the default floating-point rounding mode).
int64_t round_half_even(double x) {
  const double r = std::nearbyint(x);
  return static_cast<int64_t>(r);
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// A uniform integer in [0, n), n >= 1, by rejection (unbiased and independent of the standard
// library's distribution implementation, so orders are the same with every toolchain).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: values below it would bias the modulo
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

void shuffle(std::vector<int64_t>::iterator first, std::vector<int64_t>::iterator last, std::mt19937_64& rng) {
  const int64_t n = last - first;
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(uniform_below(rng, static_cast<uint64_t>(i) + 1));
    std::swap(first[i], first[j]);
  }
}

// Index arrays of more entries than this are refused (a request that needs them is a mistake).
constexpr int64_t kMaxIndexEntries = int64_t(1) << 34;

}  // namespace

std::array<std::pair<int64_t, int64_t>, 3> split_document_ranges(const std::string& split, int64_t num_documents) {
  MOE_CHECK(num_documents >= 0, "split_document_ranges: num_documents must be >= 0, got ", num_documents);
  const char* hint = "expected 1 to 3 non-negative numbers separated by commas, at least one > 0 "
                     "(train,valid,test weights as Megatron's --split, e.g. \"949,50,1\", \"98,2,0\", \"100\")";
  std::vector<double> w;
  size_t start = 0;
  for (;;) {
    size_t comma = split.find(',', start);
    const std::string part = trim(split.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    MOE_CHECK(!part.empty(), "split '", split, "': empty weight at position ", w.size(), ": ", hint);
    bool digits_only = part.find_first_not_of("0123456789.") == std::string::npos &&
                       part.find_first_of("0123456789") != std::string::npos;
    char* end = nullptr;
    const double v = std::strtod(part.c_str(), &end);
    MOE_CHECK(digits_only && end && *end == 0 && std::isfinite(v), "split '", split, "': weight '", part,
              "' is not a non-negative decimal number: ", hint);
    w.push_back(v);
    MOE_CHECK(w.size() <= 3, "split '", split, "': more than 3 weights: ", hint);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  while (w.size() < 3) w.push_back(0.0);
  const double sum = (w[0] + w[1]) + w[2];
  MOE_CHECK(sum > 0.0 && std::isfinite(sum), "split '", split, "': the weights sum to ", sum, ": ", hint);
  // normalize(): w / sum; then the cumulative bookends [0, c1, c2, c3] as Megatron's
  // convert_split_vector_to_split_matrix, and round(c·N) for each end.
  double c[4] = {0.0, 0.0, 0.0, 0.0};
  for (int i = 0; i < 3; ++i) c[i + 1] = c[i] + w[i] / sum;
  std::array<std::pair<int64_t, int64_t>, 3> out{};
  const int saved = std::fegetround();
  std::fesetround(FE_TONEAREST);
  for (int i = 0; i < 3; ++i) {
    int64_t b = round_half_even(c[i] * static_cast<double>(num_documents));
    int64_t e = round_half_even(c[i + 1] * static_cast<double>(num_documents));
    b = std::min(std::max<int64_t>(b, 0), num_documents);
    e = std::min(std::max<int64_t>(e, b), num_documents);
    if (!(c[i + 1] > c[i])) e = b;  // a zero-weight split: Megatron builds no dataset (None)
    out[i] = {b, e};
  }
  std::fesetround(saved);
  return out;
}

GPTDataset::GPTDataset(std::shared_ptr<const IndexedDataset> dataset, int64_t doc_begin, int64_t doc_end,
                       int64_t seq_length, int64_t num_samples, uint64_t seed)
    : ds_(std::move(dataset)), doc_begin_(doc_begin), doc_end_(doc_end), seq_length_(seq_length) {
  MOE_CHECK(ds_ != nullptr, "GPTDataset: the indexed dataset is null");
  const int64_t D = ds_->num_documents();
  MOE_CHECK(doc_begin >= 0 && doc_begin <= doc_end && doc_end <= D, "GPTDataset '", ds_->path_prefix(),
            "': document range [", doc_begin, ", ", doc_end, ") is not inside [0, ", D, ")");
  MOE_CHECK(seq_length >= 1, "GPTDataset '", ds_->path_prefix(), "': seq_length must be >= 1, got ", seq_length);
  MOE_CHECK(num_samples >= 0, "GPTDataset '", ds_->path_prefix(), "': num_samples must be >= 0 (0: one epoch), got ",
            num_samples);
  const int64_t n_docs = doc_end - doc_begin;
  MOE_CHECK(n_docs > 0 || num_samples == 0, "GPTDataset '", ds_->path_prefix(), "': ", num_samples,
            " samples requested from an empty split (document range [", doc_begin, ", ", doc_end,
            ")): give this split a non-zero --split weight or request 0 samples");
  if (n_docs == 0) return;  // size() 0
  for (int64_t d = doc_begin; d < doc_end; ++d) tokens_per_epoch_ += ds_->document_length(d);
  const int64_t T = tokens_per_epoch_;
  MOE_CHECK(T > 0 || num_samples == 0, "GPTDataset '", ds_->path_prefix(), "': ", num_samples,
            " samples requested but documents [", doc_begin, ", ", doc_end, ") hold no tokens");
  const int64_t S = seq_length;

  // Epochs: Megatron's _get_num_epochs (the fewest with E·T >= num_samples·S + 1).
  num_epochs_ = 1;
  if (num_samples > 0) {
    MOE_CHECK(num_samples <= (std::numeric_limits<int64_t>::max() - 1) / S, "GPTDataset: num_samples ", num_samples,
              " · seq_length ", S, " overflows");
    const int64_t requested = num_samples * S + 1;
    num_epochs_ = std::max<int64_t>(1, requested / T + (requested % T != 0));
  }
  const int64_t E = num_epochs_;
  MOE_CHECK(E <= kMaxIndexEntries / n_docs && (T == 0 || E <= std::numeric_limits<int64_t>::max() / T),
            "GPTDataset '", ds_->path_prefix(), "': ", num_samples, " samples of ", S, " tokens need ", E,
            " epochs of the ", n_docs, " documents (", T, " tokens each): the document index would have ",
            "more than 2^34 entries");
  const int64_t total = T > 0 ? (E * T - 1) / S : 0;  // Megatron's num_samples with drop_last_partial_sequence
  MOE_CHECK(total < kMaxIndexEntries, "GPTDataset: ", total, " samples exceed the limit of 2^34");

  std::mt19937_64 rng(seed);

  // Document index: each epoch's documents, shuffled.
  document_index_.resize(static_cast<size_t>(E * n_docs));
  for (int64_t e = 0; e < E; ++e) {
    auto first = document_index_.begin() + e * n_docs;
    for (int64_t i = 0; i < n_docs; ++i) first[i] = doc_begin + i;
    shuffle(first, first + n_docs, rng);
  }

  // Sample index: helpers.cpp build_sample_idx with add_extra_token_to_sequence = 1, storing
  // where each sample starts in the stream (position in document_index_, offset in that document).
  std::vector<int64_t> doc_len(static_cast<size_t>(n_docs));
  for (int64_t i = 0; i < n_docs; ++i) doc_len[i] = ds_->document_length(doc_begin + i);
  sample_index_.resize(static_cast<size_t>(2 * (total + 1)));
  int64_t pos = 0, doc_offset = 0;
  sample_index_[0] = 0;
  sample_index_[1] = 0;
  const int64_t last = static_cast<int64_t>(document_index_.size()) - 1;
  for (int64_t s = 1; s <= total; ++s) {
    int64_t remaining = S + 1;
    while (remaining != 0) {
      const int64_t length = doc_len[document_index_[pos] - doc_begin] - doc_offset;
      remaining -= length;
      if (remaining <= 0) {
        doc_offset += remaining + length - 1;  // the last token is the next sample's first
        remaining = 0;
      } else {
        MOE_CHECK_CODE(pos < last, ErrorCode::internal, "GPTDataset: the token stream ran out at sample ", s, " of ",
                       total);
        ++pos;
        doc_offset = 0;
      }
    }
    sample_index_[2 * s] = pos;
    sample_index_[2 * s + 1] = doc_offset;
  }

  // Shuffle index: Megatron's separate_final_epoch rule, then _build_shuffle_index.
  int64_t first_range = total;
  if (E > 1) {
    const int64_t sans_final = ((E - 1) * T - 1) / S;
    const int64_t from_final = num_samples - sans_final;
    const int64_t per_epoch = (T - 1) / S;
    MOE_CHECK_CODE(from_final >= 0 && from_final <= per_epoch + 1, ErrorCode::internal,
                   "GPTDataset: samples from the final epoch ", from_final, " outside [0, ", per_epoch + 1, "]");
    if (from_final < static_cast<int64_t>(0.80 * static_cast<double>(per_epoch))) first_range = sans_final;
  }
  shuffle_index_.resize(static_cast<size_t>(total));
  for (int64_t i = 0; i < total; ++i) shuffle_index_[i] = i;
  shuffle(shuffle_index_.begin(), shuffle_index_.begin() + first_range, rng);
  shuffle(shuffle_index_.begin() + first_range, shuffle_index_.end(), rng);
}

void GPTDataset::read_document(int64_t doc, int64_t offset, int64_t length, int64_t* out) const {
  const auto& di = ds_->document_indices();
  for (int64_t s = di[doc]; s < di[doc + 1] && length > 0; ++s) {
    const int64_t len = ds_->sequence_length(s);
    if (offset >= len) {
      offset -= len;
      continue;
    }
    const int64_t n = std::min(len - offset, length);
    ds_->read(s, offset, n, out);
    out += n;
    length -= n;
    offset = 0;
  }
  MOE_CHECK_CODE(length == 0, ErrorCode::internal, "GPTDataset: document ", doc, " is shorter than its index says");
}

void GPTDataset::sample(int64_t i, int64_t* out) const {
  MOE_CHECK(i >= 0 && i < size(), "GPTDataset '", ds_->path_prefix(), "' documents [", doc_begin_, ", ", doc_end_,
            "): sample index ", i, " out of range [0, ", size(), ")",
            size() == 0 ? " (the dataset is empty)" : "");
  const int64_t j = shuffle_index_[i];
  int64_t pos = sample_index_[2 * j], offset = sample_index_[2 * j + 1];
  int64_t remaining = seq_length_ + 1;
  while (remaining > 0) {
    const int64_t doc = document_index_[pos];
    const int64_t n = std::min(ds_->document_length(doc) - offset, remaining);
    read_document(doc, offset, n, out);
    out += n;
    remaining -= n;
    offset = 0;
    if (remaining > 0) {
      MOE_CHECK_CODE(pos + 1 < static_cast<int64_t>(document_index_.size()), ErrorCode::internal,
                     "GPTDataset: sample ", j, " runs past the token stream");
      ++pos;
    }
  }
}

std::vector<int64_t> GPTDataset::sample(int64_t i) const {
  std::vector<int64_t> out(static_cast<size_t>(seq_length_ + 1));
  sample(i, out.data());
  return out;
}

}  // namespace moe

// libmoecore — training data: Megatron's indexed dataset (.bin/.idx), the GPT sample construction
// over it, the train/valid/test split, and a byte-level tokenizer.
//
// The files are Megatron Core's `MMIDIDX` format (megatron/core/datasets/indexed_dataset.py), so a
// corpus prepared by Megatron's tools/preprocess_data.py loads here and ours loads there:
//
//   PREFIX.idx  (little-endian)
//     magic            9 bytes  "MMIDIDX\x00\x00"
//     version          u64      1
//     dtype code       u8       Megatron's DType: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
//                               6 float64, 7 float32, 8 uint16
//     sequence count   u64      S
//     document count   u64      D + 1 (the length of the document-index array below)
//     sequence lengths int32[S] tokens per sequence
//     sequence ptrs    int64[S] byte offset of each sequence in PREFIX.bin
//     document indices int64[D + 1]  0, then the sequence index where each document ENDS
//                               (= where the next starts); the last entry is S. A document may
//                               hold zero sequences (Megatron writes one for an empty text).
//     (Megatron's multimodal variant appends int8[S] sequence modes; refused here.)
//   PREFIX.bin  the tokens of every sequence, back to back, in the dtype above.
//
// Opening validates everything against the file sizes before any token is read: magic, version,
// dtype code, the counts against the .idx size, every length >= 0, every pointer exactly where
// Megatron's writer puts it (contiguous from 0: pointer[i] = Σ_{j<i} length[j]·itemsize), the .bin
// size equal to the bytes the index describes, document indices starting at 0, non-decreasing and
// ending at S. A malformed file is an Error(invalid_argument) naming the file, the field, expected
// vs got; an unreadable one an Error(io). Both files are memory-mapped read-only; a file truncated
// by someone else AFTER it was opened can still fault (SIGBUS), as with any mmap.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moe {

// Token storage types with Megatron's DType codes (the values are the codes in the .idx).
enum class TokenDType : uint8_t {
  uint8 = 1,
  int8 = 2,
  int16 = 3,
  int32 = 4,
  int64 = 5,
  float64 = 6,
  float32 = 7,
  uint16 = 8,
};

size_t token_dtype_size(TokenDType dt);        // bytes per token
const char* token_dtype_name(TokenDType dt);   // "uint16", ... (numpy's names, as Megatron's enum)
// The dtype of a Megatron code; an Error naming the accepted codes otherwise.
TokenDType token_dtype_from_code(int code);
// Megatron's DType.optimal_dtype: uint16 when vocab_size < 65500, else int32.
TokenDType token_dtype_for_vocab(int64_t vocab_size);
// The range of token ids a dtype stores exactly ([0, 255] for uint8, [-2^53, 2^53] for float64...).
int64_t token_dtype_min(TokenDType dt);
int64_t token_dtype_max(TokenDType dt);

// The .bin / .idx paths of a prefix (Megatron's get_bin_path / get_idx_path).
std::string indexed_dataset_bin_path(const std::string& path_prefix);
std::string indexed_dataset_idx_path(const std::string& path_prefix);

// A Megatron indexed dataset, read-only and memory-mapped. Not copyable; share it through
// std::shared_ptr<const IndexedDataset> (every const method is safe from several threads).
class IndexedDataset {
 public:
  // `path_prefix`: the path without .bin/.idx, as Megatron's --data-path.
  explicit IndexedDataset(const std::string& path_prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& path_prefix() const { return prefix_; }
  TokenDType dtype() const { return dtype_; }
  int64_t num_sequences() const { return num_sequences_; }
  // Megatron's len(document_indices) - 1.
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
  int64_t num_tokens() const { return num_tokens_; }  // Σ sequence lengths
  int64_t sequence_length(int64_t i) const;
  // (D + 1): 0, the end (exclusive sequence index) of each document; back() == num_sequences().
  const std::vector<int64_t>& document_indices() const { return document_indices_; }
  // Tokens of the document: Σ lengths of its sequences [document_indices[d], document_indices[d+1]).
  int64_t document_length(int64_t d) const;

  // Tokens [offset, offset + length) of sequence `seq` (length -1: to its end), widened to i64
  // (float dtypes must hold integral values). Bounds are checked with the sequence named.
  std::vector<int64_t> get(int64_t seq, int64_t offset = 0, int64_t length = -1) const;
  // The same into out[0, length) (no allocation); length >= 0 here.
  void read(int64_t seq, int64_t offset, int64_t length, int64_t* out) const;

 private:
  struct Mapping;
  std::string prefix_;
  TokenDType dtype_ = TokenDType::uint16;
  int64_t num_sequences_ = 0;
  int64_t num_tokens_ = 0;
  std::unique_ptr<Mapping> idx_;  // PREFIX.idx mapped
  std::unique_ptr<Mapping> bin_;  // PREFIX.bin mapped (absent when it is empty)
  const unsigned char* lengths_ = nullptr;   // int32[S] inside idx_ (unaligned reads via memcpy)
  const unsigned char* pointers_ = nullptr;  // int64[S] inside idx_
  std::vector<int64_t> document_indices_;    // (D + 1) copied out of idx_
};

// Writes a Megatron indexed dataset: PREFIX.bin and PREFIX.idx, byte-identical to what Megatron's
// IndexedDatasetBuilder writes for the same documents and dtype. Tokens stream to temp files next
// to the targets; finalize() fsyncs them and renames them over PREFIX.bin, then PREFIX.idx. On any
// failure (or when the writer is destroyed without finalize) the temp files are removed and
// previous files at PREFIX.{bin,idx} are left untouched. (The two renames are not one atomic step:
// a crash between them leaves a new .bin beside the old .idx, which the reader then refuses
// because the sizes disagree.)
class IndexedDatasetWriter {
 public:
  IndexedDatasetWriter(const std::string& path_prefix, TokenDType dtype);
  ~IndexedDatasetWriter();
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // One document as one sequence (Megatron's preprocess_data without --split-sentences). An empty
  // `tokens` records a document with no sequence, as Megatron does for an empty text. Every token
  // must fit the dtype (checked before anything is written; the error names the document, the
  // position, the value and the range).
  void add_document(const std::vector<int64_t>& tokens);
  // Writes the index and publishes both files. Once only; add_document is refused afterwards.
  void finalize();

  TokenDType dtype() const { return dtype_; }
  int64_t num_documents() const { return static_cast<int64_t>(document_indices_.size()) - 1; }
  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  void abandon() noexcept;
  std::string prefix_;
  TokenDType dtype_;
  std::string bin_tmp_, idx_tmp_;
  int bin_fd_ = -1;
  bool finalized_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_indices_{0};
  int64_t num_tokens_ = 0;
  std::vector<unsigned char> buffer_;  // pending .bin bytes
};

// Megatron's --split "949,50,1" over `num_documents` documents: the weights (1 to 3 non-negative
// numbers separated by commas, missing ones 0, at least one > 0) are normalised to sum 1, and
// split i is [round(c_i·N), round(c_{i+1}·N)) with c the cumulative sums (c_0 = 0) in f64 and
// round half to even (Python's round), as blended_megatron_dataset_builder does. Returns
// train/valid/test [begin, end) document ranges; a zero-weight split is empty. "949,50,1" on 1000
// documents: [0,949) [949,999) [999,1000). (Megatron splits a GPT corpus over sequences; our
// writer stores one sequence per document, where the two agree.)
std::array<std::pair<int64_t, int64_t>, 3> split_document_ranges(const std::string& split, int64_t num_documents);

// Megatron's GPT samples over documents [doc_begin, doc_end) of an indexed dataset
// (megatron/core/datasets/gpt_dataset.py with add_extra_token_to_sequence and
// drop_last_partial_sequence, the defaults):
//  - epochs: the fewest E with E·T >= num_samples·seq_length + 1, T the split's tokens per epoch
//    (num_samples 0: one epoch, Megatron's num_samples=None);
//  - document index: each epoch's documents in an order shuffled by the seed;
//  - the documents of all epochs concatenated into one token stream; sample j is its tokens
//    [j·seq_length, j·seq_length + seq_length + 1): samples span documents and consecutive ones
//    overlap by one token (the last input token is the next sample's first). There are
//    (E·T − 1) / seq_length of them (size() may exceed num_samples);
//  - shuffle index: sample(i) is sample shuffle_index()[i]. As Megatron, when the samples needed
//    from the final epoch are fewer than 80% of an epoch's, the samples that lie within the earlier
//    epochs (the first ((E−1)·T − 1) / seq_length) are shuffled among themselves and placed first,
//    the rest shuffled after them, so the first num_samples samples cover whole epochs first.
// Differences from Megatron: the RNG is std::mt19937_64 seeded with `seed` and our own unbiased
// Fisher–Yates (not numpy's RandomState), so orders are deterministic and portable but not
// bit-compatible with Megatron's; documents are shuffled within each epoch (Megatron shuffles the
// document index of all non-final epochs together); the unit is the document (Megatron's GPT unit
// is the sequence; identical for one sequence per document).
class GPTDataset {
 public:
  // An empty range gives size() 0 when num_samples is 0 and an error when samples are requested.
  GPTDataset(std::shared_ptr<const IndexedDataset> dataset, int64_t doc_begin, int64_t doc_end,
             int64_t seq_length, int64_t num_samples, uint64_t seed);

  int64_t size() const { return static_cast<int64_t>(shuffle_index_.size()); }
  // seq_length + 1 tokens: inputs are [0, seq_length), labels [1, seq_length + 1).
  std::vector<int64_t> sample(int64_t i) const;
  void sample(int64_t i, int64_t* out) const;  // the same into out[0, seq_length + 1)

  int64_t seq_length() const { return seq_length_; }
  int64_t num_epochs() const { return num_epochs_; }
  int64_t tokens_per_epoch() const { return tokens_per_epoch_; }
  std::pair<int64_t, int64_t> document_range() const { return {doc_begin_, doc_end_}; }
  // (E · (doc_end − doc_begin)) document ids in stream order, epoch by epoch.
  const std::vector<int64_t>& document_index() const { return document_index_; }
  // (size()) sample(i) is unshuffled sample shuffle_index()[i].
  const std::vector<int64_t>& shuffle_index() const { return shuffle_index_; }

 private:
  void read_document(int64_t doc, int64_t offset, int64_t length, int64_t* out) const;
  std::shared_ptr<const IndexedDataset> ds_;
  int64_t doc_begin_, doc_end_, seq_length_;
  int64_t num_epochs_ = 0, tokens_per_epoch_ = 0;
  std::vector<int64_t> document_index_;
  std::vector<int64_t> sample_index_;  // (size() + 1, 2): [position in document_index_, offset]
  std::vector<int64_t> shuffle_index_;
};

// Byte-level tokenizer: ids 0..255 are the bytes of the UTF-8 (or any) text, 256 is the
// end-of-document token. decode renders ids outside [0, 255] (eod, padding ids) as nothing.
struct ByteTokenizer {
  static constexpr int64_t eod = 256;
  static constexpr int64_t vocab_size = 257;
  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids) const;
};

// Megatron's _vocab_size_with_padding: `vocab` rounded up to a multiple of divisible_by · tp
// (the defaults are 128 and 1: 257 → 384).
int64_t padded_vocab_size(int64_t vocab, int64_t divisible_by = 128, int64_t tp = 1);

}  // namespace moe

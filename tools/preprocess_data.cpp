// preprocess_data — text to a Megatron indexed dataset (.bin/.idx), as Megatron's
// tools/preprocess_data.py does, with the byte-level tokenizer (ids 0..255 = bytes, 256 = eod).
//
//   preprocess_data --input FILE [--input FILE ...] --output-prefix PREFIX
//                   [--json-keys text [KEY ...]] [--append-eod] [--format auto|jsonl|text|fortune]
//
// Example (the default corpus, see scripts/prepare_corpus.sh):
//
//   build/tools/preprocess_data --input /usr/share/games/fortunes/fortunes --format fortune
//                               --output-prefix data/fortunes --append-eod
//   -> data/fortunes_text_document.{bin,idx}   (the trainer's --data-path data/fortunes_text_document)
//
// Input formats (--format; auto: .jsonl / .json files are JSON lines, files with a line that is
// exactly "%" are fortune files, anything else is text):
//   jsonl    one JSON object per line; each --json-keys key holds a string (or an array of strings,
//            concatenated, as Megatron's sentence lists); blank lines are skipped
//   text     documents are paragraphs: runs of lines separated by blank (whitespace-only) lines
//   fortune  documents are separated by lines containing only "%" (the fortune(6) format)
// A document's text is its lines joined with "\n" (a trailing "\r" of each line dropped); it is
// tokenized to its bytes, and --append-eod appends the eod token (256) to every non-empty document.
// --shuffle-seed N (ours, not Megatron's) writes the documents in a seeded random order.
// Empty documents are skipped (and counted). Every document is one sequence.
//
// Output: for each key, PREFIX_{key}_document.{bin,idx} (Megatron's naming: level "document"),
// dtype uint16 (Megatron's choice for a vocabulary < 65500). Text and fortune inputs feed the
// single key (default "text"). Prints the counts. Any bad input (unreadable file, invalid JSON, a
// missing key, no documents at all, ...) is an error naming the file and line, exit status 1, and
// nothing is written (the outputs go through temp files that are removed on failure).
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moecore/data.h"
#include "moecore/error.h"

using namespace moe;

namespace {

enum class Format { auto_, jsonl, text, fortune };

const char* format_name(Format f) {
  switch (f) {
    case Format::auto_: return "auto";
    case Format::jsonl: return "jsonl";
    case Format::text: return "text";
    case Format::fortune: return "fortune";
  }
  return "?";
}

struct Options {
  std::vector<std::string> inputs;
  std::string output_prefix;
  std::vector<std::string> json_keys;
  bool append_eod = false;
  Format format = Format::auto_;
  std::optional<uint64_t> shuffle_seed;  // ours, not Megatron's: documents written in a seeded random order
};

const char* kUsage =
    "usage: preprocess_data --input FILE [--input FILE ...] --output-prefix PREFIX\n"
    "                       [--json-keys text [KEY ...]] [--append-eod] [--format auto|jsonl|text|fortune]\n"
    "                       [--shuffle-seed N]\n";

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_format = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    MOE_CHECK(a.rfind("--", 0) == 0, "unexpected argument '", a, "': flags look like --name value");
    std::string name = a.substr(2);
    bool inline_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    for (char& c : name)
      if (c == '_') c = '-';
    auto next_value = [&]() {
      if (inline_value) return value;
      MOE_CHECK(i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0, "flag --", name, " needs a value");
      return std::string(argv[++i]);
    };
    if (name == "input") {
      o.inputs.push_back(next_value());
    } else if (name == "output-prefix") {
      MOE_CHECK(o.output_prefix.empty(), "flag --output-prefix given twice");
      o.output_prefix = next_value();
      MOE_CHECK(!o.output_prefix.empty(), "flag --output-prefix: empty prefix");
    } else if (name == "json-keys") {
      MOE_CHECK(o.json_keys.empty(), "flag --json-keys given twice");
      if (inline_value) {
        o.json_keys.push_back(value);
      } else {
        while (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) o.json_keys.push_back(argv[++i]);
      }
      MOE_CHECK(!o.json_keys.empty(), "flag --json-keys needs at least one key");
      for (const auto& k : o.json_keys) MOE_CHECK(!k.empty(), "flag --json-keys: empty key");
    } else if (name == "append-eod") {
      MOE_CHECK(!inline_value, "flag --append-eod takes no value");
      MOE_CHECK(!o.append_eod, "flag --append-eod given twice");
      o.append_eod = true;
    } else if (name == "shuffle-seed") {
      MOE_CHECK(!o.shuffle_seed, "flag --shuffle-seed given twice");
      const std::string v = next_value();
      char* end = nullptr;
      const unsigned long long seed = std::strtoull(v.c_str(), &end, 10);
      MOE_CHECK(!v.empty() && end && *end == 0, "flag --shuffle-seed: expected a non-negative integer, got '", v, "'");
      o.shuffle_seed = seed;
    } else if (name == "format") {
      MOE_CHECK(!have_format, "flag --format given twice");
      have_format = true;
      const std::string f = next_value();
      if (f == "auto") o.format = Format::auto_;
      else if (f == "jsonl") o.format = Format::jsonl;
      else if (f == "text") o.format = Format::text;
      else if (f == "fortune") o.format = Format::fortune;
      else MOE_CHECK(false, "flag --format: expected auto, jsonl, text or fortune, got '", f, "'");
    } else {
      MOE_CHECK(false, "unknown flag --", name, "\n", kUsage);
    }
  }
  MOE_CHECK(!o.inputs.empty(), "missing required flag --input\n", kUsage);
  MOE_CHECK(!o.output_prefix.empty(), "missing required flag --output-prefix\n", kUsage);
  if (o.json_keys.empty()) o.json_keys = {"text"};
  return o;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_blank(const std::string& line) { return line.find_first_not_of(" \t\r\f\v") == std::string::npos; }

std::unique_ptr<std::ifstream> open_input(const std::string& path) {
  auto in = std::make_unique<std::ifstream>(path, std::ios::binary);
  MOE_CHECK_CODE(in->is_open(), ErrorCode::io, "cannot open input '", path, "': ", std::strerror(errno));
  return in;
}

// Reads one line without its "\n" (and a trailing "\r"); false at the end.
bool next_line(std::istream& in, const std::string& path, std::string& line) {
  if (!std::getline(in, line)) {
    MOE_CHECK_CODE(in.eof(), ErrorCode::io, "reading input '", path, "' failed");
    return false;
  }
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return true;
}

Format detect_format(const std::string& path) {
  if (ends_with(path, ".jsonl") || ends_with(path, ".json")) return Format::jsonl;
  auto in = open_input(path);
  std::string line;
  while (next_line(*in, path, line))
    if (line == "%") return Format::fortune;
  return Format::text;
}

struct Counts {
  int64_t documents = 0;
  int64_t skipped_empty = 0;
};

class Sink {
 public:
  Sink(const std::vector<std::string>& keys, const std::string& prefix, bool append_eod,
       std::optional<uint64_t> shuffle_seed)
      : append_eod_(append_eod), shuffle_seed_(shuffle_seed) {
    const TokenDType dtype = token_dtype_for_vocab(ByteTokenizer::vocab_size);
    for (const auto& k : keys) {
      paths_.push_back(prefix + "_" + k + "_document");
      writers_.push_back(std::make_unique<IndexedDatasetWriter>(paths_.back(), dtype));
      counts_.emplace_back();
      held_.emplace_back();
    }
  }
  // The document `text` for key number k.
  void add(size_t k, const std::string& text) {
    std::vector<int64_t> ids = tokenizer_.encode(text);
    if (ids.empty()) {
      ++counts_[k].skipped_empty;
      return;
    }
    if (append_eod_) ids.push_back(ByteTokenizer::eod);
    ++counts_[k].documents;
    if (shuffle_seed_) {
      held_[k].push_back(std::move(ids));
      return;
    }
    writers_[k]->add_document(ids);
  }
  // Writes the held documents (--shuffle-seed: in a Fisher-Yates order drawn from mt19937_64(seed),
  // so every part of a --split sees every input file) and the index files.
  void finalize() {
    for (size_t k = 0; k < writers_.size(); ++k) {
      auto& docs = held_[k];
      if (shuffle_seed_) {
        std::mt19937_64 rng(*shuffle_seed_);
        for (size_t i = docs.size(); i > 1; --i) std::swap(docs[i - 1], docs[rng() % i]);
      }
      for (const auto& d : docs) writers_[k]->add_document(d);
      docs.clear();
      writers_[k]->finalize();
    }
  }
  size_t size() const { return writers_.size(); }
  const std::string& path(size_t k) const { return paths_[k]; }
  const Counts& counts(size_t k) const { return counts_[k]; }
  IndexedDatasetWriter& writer(size_t k) { return *writers_[k]; }

 private:
  bool append_eod_;
  std::optional<uint64_t> shuffle_seed_;
  std::vector<std::vector<std::vector<int64_t>>> held_;  // per key, with --shuffle-seed
  ByteTokenizer tokenizer_;
  std::vector<std::string> paths_;
  std::vector<std::unique_ptr<IndexedDatasetWriter>> writers_;
  std::vector<Counts> counts_;
};

std::string join_lines(const std::vector<std::string>& lines) {
  std::string s;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (i) s += '\n';
    s += lines[i];
  }
  return s;
}

// Paragraphs (text) or %-separated entries (fortune) into key 0.
void read_separated(const std::string& path, Format format, Sink& sink) {
  auto in = open_input(path);
  std::vector<std::string> lines;
  std::string line;
  auto flush = [&]() {
    // A fortune made only of blank lines is empty; a paragraph is never blank.
    bool blank = true;
    for (const auto& l : lines) blank = blank && is_blank(l);
    sink.add(0, blank ? std::string() : join_lines(lines));
    lines.clear();
  };
  while (next_line(*in, path, line)) {
    const bool separator = format == Format::fortune ? line == "%" : is_blank(line);
    if (separator) {
      if (format == Format::fortune || !lines.empty()) flush();
    } else {
      lines.push_back(line);
    }
  }
  if (!lines.empty()) flush();
}

std::string json_type(const nlohmann::json& v) { return v.type_name(); }

void read_jsonl(const std::string& path, const std::vector<std::string>& keys, Sink& sink) {
  auto in = open_input(path);
  std::string line;
  int64_t line_no = 0;
  while (next_line(*in, path, line)) {
    ++line_no;
    if (is_blank(line)) continue;
    nlohmann::json obj;
    try {
      obj = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      MOE_CHECK(false, path, ":", line_no, ": invalid JSON: ", e.what());
    }
    MOE_CHECK(obj.is_object(), path, ":", line_no, ": expected a JSON object, got a ", json_type(obj));
    for (size_t k = 0; k < keys.size(); ++k) {
      auto it = obj.find(keys[k]);
      if (it == obj.end()) {
        std::string have;
        for (auto f = obj.begin(); f != obj.end(); ++f) have += (have.empty() ? "" : ", ") + f.key();
        MOE_CHECK(false, path, ":", line_no, ": no key '", keys[k], "' (--json-keys); the object has: ",
                  have.empty() ? "no keys" : have);
      }
      std::string text;
      if (it->is_string()) {
        text = it->get<std::string>();
      } else if (it->is_array()) {
        for (size_t j = 0; j < it->size(); ++j) {
          const auto& part = (*it)[j];
          MOE_CHECK(part.is_string(), path, ":", line_no, ": key '", keys[k], "' element ", j,
                    ": expected a string, got a ", json_type(part));
          text += part.get<std::string>();
        }
      } else {
        MOE_CHECK(false, path, ":", line_no, ": key '", keys[k], "': expected a string or an array of strings, got a ",
                  json_type(*it));
      }
      sink.add(k, text);
    }
  }
}

int run(int argc, char** argv) {
  if (argc == 1) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  const Options opt = parse_args(argc, argv);

  // Formats first, so a bad input is refused before any output exists.
  std::vector<Format> formats;
  for (const auto& path : opt.inputs) {
    Format f = opt.format == Format::auto_ ? detect_format(path) : opt.format;
    if (opt.format != Format::auto_) open_input(path);  // readable?
    MOE_CHECK(f == Format::jsonl || opt.json_keys.size() == 1, "input '", path, "' is ", format_name(f),
              ": its documents feed one key, but --json-keys names ", opt.json_keys.size());
    formats.push_back(f);
  }

  Sink sink(opt.json_keys, opt.output_prefix, opt.append_eod, opt.shuffle_seed);
  auto totals = [&]() {
    Counts c;
    for (size_t k = 0; k < sink.size(); ++k) {
      c.documents += sink.counts(k).documents;
      c.skipped_empty += sink.counts(k).skipped_empty;
    }
    return c;
  };
  for (size_t i = 0; i < opt.inputs.size(); ++i) {
    const Counts before = totals();
    if (formats[i] == Format::jsonl)
      read_jsonl(opt.inputs[i], opt.json_keys, sink);
    else
      read_separated(opt.inputs[i], formats[i], sink);
    const Counts after = totals();
    std::printf("preprocess_data: %s (%s): %lld documents, %lld empty skipped\n", opt.inputs[i].c_str(),
                format_name(formats[i]), static_cast<long long>(after.documents - before.documents),
                static_cast<long long>(after.skipped_empty - before.skipped_empty));
  }
  for (size_t k = 0; k < sink.size(); ++k)
    MOE_CHECK(sink.counts(k).documents > 0, "no non-empty document for key '", opt.json_keys[k], "' in the ",
              opt.inputs.size(), " input file(s): nothing to write");
  sink.finalize();
  for (size_t k = 0; k < sink.size(); ++k) {
    const IndexedDatasetWriter& w = sink.writer(k);
    std::printf("preprocess_data: key '%s': %lld documents (%lld empty skipped), %lld sequences, %lld tokens, %s%s"
                " -> %s.{bin,idx}\n",
                opt.json_keys[k].c_str(), static_cast<long long>(w.num_documents()),
                static_cast<long long>(sink.counts(k).skipped_empty), static_cast<long long>(w.num_sequences()),
                static_cast<long long>(w.num_tokens()), token_dtype_name(w.dtype()),
                opt.append_eod ? ", eod appended" : "", sink.path(k).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "preprocess_data: %s\n", e.what());
    return 1;
  }
}

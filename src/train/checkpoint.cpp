// save_checkpoint / load_checkpoint (include/moecore/checkpoint.h, docs/checkpoints.md).
//
// Save, on every rank:
//   1. rank 0 picks a nonce and creates DIR/iter_N.tmp-<nonce>/ (stale temp directories of crashed
//      saves are removed first);
//   2. every rank lists what it holds as canonical boxes: each parameter's local shard (two boxes
//      per GLU-halves piece), and each optimizer state slice (a flat range of the local shard, cut
//      into row-major contiguous boxes);
//   3. the lists are all-gathered (metadata only); the boxes of each tensor are put in one order
//      (replicas of the very same box taking turns over their holders) and each rank keeps, of
//      every box it holds, the part no earlier box covers (box subtraction): each element gets
//      exactly one writer;
//   4. each writing rank streams its slices into shard_r<rank>.safetensors (CRC-32 per slice), fsync;
//   5. the slice records are all-gathered; rank 0 checks that every tensor is covered exactly and
//      writes index.json (fsync);
//   6. rank 0 renames the directory into place (swapping atomically with an existing one), then
//      replaces the tracker through a temp file + rename, fsync'ing the parent each time.
// Every step that can fail locally ends with an agreement (the error strings all-gathered), so all
// ranks throw together instead of leaving peers blocked in a collective.
//
// Load: every rank reads the index, checks the model (architecture keys, names, shapes), intersects
// the boxes it holds with the slices of each tensor, checks the size of every file it needs, then
// opens those files one at a time and copies each intersecting slice (CRC-checked) into place.
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "core/json_strict.h"
#include "moecore/comm.h"
#include "moecore/model.h"
#include "moecore/optim.h"
#include "moecore/parallel.h"
#include "train/checkpoint_internal.h"

namespace moe {

using namespace ckpt;
namespace fs = std::filesystem;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Every rank's string, in rank order (each sent with a leading byte so none is empty).
std::vector<std::string> all_gather_strings(Communicator& c, const std::string& s) {
  const int n = c.size();
  if (n == 1) return {s};
  const std::string payload = "#" + s;
  Tensor len = Tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(payload.size())}, {1});
  Tensor lens = Tensor::empty({n}, DType::i64);
  c.all_gather(len, lens);
  const std::vector<int64_t> rows = lens.to_vector<int64_t>();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  Tensor in = Tensor::empty({static_cast<int64_t>(payload.size())}, DType::u8);
  std::memcpy(in.data(), payload.data(), payload.size());
  Tensor out = Tensor::empty({total}, DType::u8);
  c.all_gather_v(in, out, rows);
  std::vector<std::string> res;
  const char* p = static_cast<const char*>(out.data());
  int64_t off = 0;
  for (int64_t r : rows) {
    res.emplace_back(p + off + 1, static_cast<size_t>(r - 1));
    off += r;
  }
  return res;
}

// A local failure, to be agreed on.
struct Failure {
  bool failed = false;
  ErrorCode code = ErrorCode::io;
  std::string message;
  template <class F>
  void run(F&& f) {
    if (failed) return;
    try {
      f();
    } catch (const Error& e) {
      failed = true;
      code = e.code();
      message = e.detail();
    } catch (const std::exception& e) {
      failed = true;
      code = ErrorCode::io;
      message = e.what();
    }
  }
};

// All ranks learn whether any rank failed; then every rank throws the first failure (lowest rank).
void agree(Communicator& world, const Failure& f, const char* what) {
  std::string mine;
  if (f.failed) mine = std::to_string(static_cast<int>(f.code)) + " " + f.message;
  const std::vector<std::string> all = all_gather_strings(world, mine);
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].empty()) continue;
    const size_t sp = all[r].find(' ');
    const auto code = static_cast<ErrorCode>(std::stoi(all[r].substr(0, sp)));
    const std::string msg = all[r].substr(sp + 1);
    if (all.size() == 1) throw Error(code, msg);
    throw Error(code, std::string(what) + ": rank " + std::to_string(r) + " failed: " + msg);
  }
}

// MOE_CKPT_FAIL_AT=<phase>[:<rank>]: exit at once after that phase (a crash, for tests).
struct FailAt {
  std::string phase;
  int rank = -1;
};
FailAt fail_at_from_env() {
  FailAt f;
  const char* v = std::getenv("MOE_CKPT_FAIL_AT");
  if (!v || !*v) return f;
  std::string s = v;
  const size_t colon = s.find(':');
  if (colon != std::string::npos) {
    f.rank = std::atoi(s.c_str() + colon + 1);
    s = s.substr(0, colon);
  }
  const auto& ph = checkpoint_phases();
  MOE_CHECK(std::find(ph.begin(), ph.end(), s) != ph.end(), "MOE_CKPT_FAIL_AT: unknown phase '", s,
            "' (expected start, shards, index, publish, tracker or done, optionally :<rank>)");
  f.phase = s;
  return f;
}

std::string hex_nonce() {
  std::random_device rd;
  uint64_t x = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  x ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  x ^= static_cast<uint64_t>(::getpid()) << 17;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

std::string slice_key(const std::string& tensor, const Box& b) {
  std::string k = tensor + "@";
  for (size_t d = 0; d < b.off.size(); ++d) {
    if (d) k += ',';
    k += std::to_string(b.off[d]);
  }
  return k;
}

json box_json(const Box& b) { return json::array({b.off, b.len}); }
Box box_from(const json& j) {
  Box b;
  b.off = j.at(0).get<std::vector<int64_t>>();
  b.len = j.at(1).get<std::vector<int64_t>>();
  return b;
}

// What a rank holds of one canonical tensor: a host array and the canonical boxes it covers.
struct Item {
  std::string tensor, kind, param;
  Shape shape;
  DType dtype = DType::f32;
  Tensor keep;  // the host tensor the view points into
  HostView view;
  std::vector<Mapped> regions;
};

// A host tensor of t (t itself when it is on the CPU).
Tensor host_of(const Tensor& t) { return t.device().is_cpu() ? t : t.to(Device::cpu()); }

Item param_item(Parameter* p, const std::string& tensor, const std::string& kind, const Tensor& data, int64_t begin,
                int64_t length) {
  Item it;
  it.tensor = tensor;
  it.kind = kind;
  it.param = p->name;
  it.shape = p->canonical_shape;
  it.keep = host_of(data);
  it.dtype = it.keep.dtype();
  it.view = HostView{static_cast<char*>(it.keep.data()), it.dtype, shard_shape(p->canonical_shape, p->shard), begin,
                     length};
  it.regions = local_regions(p->canonical_shape, p->shard, begin, begin + length);
  return it;
}

std::vector<Parameter*> unique_params(const std::vector<Parameter*>& params) {
  std::vector<Parameter*> out;
  std::unordered_set<const Parameter*> seen;
  for (Parameter* p : params)
    if (p && p->value.defined() && seen.insert(p).second) out.push_back(p);
  return out;
}

struct StateKind {
  const char* kind;
  const char* prefix;
  Tensor OptimizerStateSlice::*member;
};
const std::vector<StateKind>& state_kinds() {
  static const std::vector<StateKind> k = {
      {"fp32_param", kMasterPrefix, &OptimizerStateSlice::master},
      {"exp_avg", kExpAvgPrefix, &OptimizerStateSlice::exp_avg},
      {"exp_avg_sq", kExpAvgSqPrefix, &OptimizerStateSlice::exp_avg_sq},
      {"momentum_buffer", kMomentumPrefix, &OptimizerStateSlice::momentum},
  };
  return k;
}

ordered_json layout_json(const ProcessGroups& g, const Optimizer* opt, const std::vector<Parameter*>& params) {
  ordered_json l = ordered_json::object();
  l["world_size"] = g.world().size();
  l["tp"] = g.sizes().tp;
  l["cp"] = g.sizes().cp;
  l["pp"] = g.sizes().pp;
  l["ep"] = g.sizes().ep;
  l["etp"] = g.sizes().etp;
  l["dp"] = g.dp_size();
  l["edp"] = g.edp_size();
  l["order"] = g.sizes().order;
  l["use_distributed_optimizer"] = opt ? opt->config().use_distributed_optimizer : false;
  l["params_dtype"] = params.empty() ? std::string("none") : std::string(dtype_name(params[0]->value.dtype()));
  return l;
}

// Writes one shard file: header, then every piece streamed (straight from memory when contiguous).
struct Piece {
  size_t item;
  Mapped m;
};
struct WrittenSlice {
  std::string tensor, key;
  Box box;
  uint64_t begin, end;
  uint32_t crc;
};
uint64_t write_shard(const std::string& path, const std::vector<Item>& items, const std::vector<Piece>& pieces,
                     std::vector<WrittenSlice>& out) {
  ordered_json header = ordered_json::object();
  uint64_t off = 0;
  out.clear();
  for (const Piece& pc : pieces) {
    const Item& it = items[pc.item];
    WrittenSlice w;
    w.tensor = it.tensor;
    w.key = slice_key(it.tensor, pc.m.box);
    w.box = pc.m.box;
    w.begin = off;
    w.end = off + static_cast<uint64_t>(pc.m.box.numel()) * dtype_size(it.dtype);
    ordered_json e = ordered_json::object();
    e["dtype"] = st_dtype_name(it.dtype);
    e["shape"] = pc.m.box.len;
    e["data_offsets"] = {w.begin, w.end};
    MOE_CHECK_CODE(!header.contains(w.key), ErrorCode::internal, "save checkpoint: slice key '", w.key, "' twice");
    header[w.key] = std::move(e);
    off = w.end;
    out.push_back(std::move(w));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char lb[8];
  for (int i = 0; i < 8; ++i) lb[i] = static_cast<unsigned char>((static_cast<uint64_t>(text.size()) >> (8 * i)) & 0xff);

  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  MOE_CHECK_CODE(fd >= 0, ErrorCode::io, "save checkpoint: cannot create '", path, "': ", std::strerror(errno));
  try {
    write_fully(fd, lb, 8, path);
    write_fully(fd, text.data(), text.size(), path);
    std::vector<char> buf;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Item& it = items[pieces[i].item];
      const Mapped& m = pieces[i].m;
      const size_t bytes = static_cast<size_t>(m.box.numel()) * dtype_size(it.dtype);
      // Contiguous in the source when all dimensions but the trailing ones it spans fully are 1.
      const size_t n = m.box.off.size();
      size_t k = n == 0 ? 0 : n - 1;
      while (k > 0 && m.box.len[k] == it.view.shape[k]) --k;
      bool contiguous = true;
      for (size_t d = 0; d < k; ++d) contiguous = contiguous && m.box.len[d] == 1;
      const char* src = nullptr;
      if (contiguous) {
        int64_t flat = 0, stride = 1;
        for (size_t d = n; d-- > 0;) {
          flat += (m.box.off[d] - m.shift[d]) * stride;
          stride *= it.view.shape[d];
        }
        src = it.view.data + (flat - it.view.base) * static_cast<int64_t>(dtype_size(it.dtype));
      } else {
        buf.resize(bytes);
        HostView dst{buf.data(), it.dtype, m.box.len, 0, m.box.numel()};
        copy_box(m.box, it.view, m.shift, dst, m.box.off);
        src = buf.data();
      }
      out[i].crc = crc32(src, bytes);
      write_fully(fd, src, bytes, path);
    }
    MOE_CHECK_CODE(::fsync(fd) == 0, ErrorCode::io, "save checkpoint: fsync of '", path, "' failed: ",
                   std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  MOE_CHECK_CODE(::close(fd) == 0, ErrorCode::io, "save checkpoint: closing '", path, "' failed");
  return 8 + text.size() + off;
}

// Removes leftovers of crashed saves: DIR/iter_*.tmp-*, DIR/iter_*.old-*, the tracker's temp files.
void remove_stale(const std::string& dir) {
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const bool stale_dir = name.rfind("iter_", 0) == 0 &&
                           (name.find(".tmp-") != std::string::npos || name.find(".old-") != std::string::npos);
    const bool stale_tracker = name.rfind(std::string(kTracker) + ".tmp-", 0) == 0;
    if (stale_dir || stale_tracker) fs::remove_all(e.path(), ec);
  }
}

// Puts `tmp` at `final_dir`: a plain rename, or an atomic exchange with an existing directory.
void publish_dir(const std::string& tmp, const std::string& final_dir, const std::string& nonce) {
  if (::rename(tmp.c_str(), final_dir.c_str()) == 0) return;
  const int err = errno;
  MOE_CHECK_CODE(err == ENOTEMPTY || err == EEXIST, ErrorCode::io, "save checkpoint: renaming '", tmp, "' to '",
                 final_dir, "' failed: ", std::strerror(err));
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    std::error_code ec;
    fs::remove_all(tmp, ec);  // now the old checkpoint
    return;
  }
  // No RENAME_EXCHANGE on this file system: move the old one aside first (a crash between the two
  // renames leaves no iter directory for this iteration; the tracker may then point at nothing).
  const std::string old = final_dir + ".old-" + nonce;
  MOE_CHECK_CODE(::rename(final_dir.c_str(), old.c_str()) == 0 && ::rename(tmp.c_str(), final_dir.c_str()) == 0,
                 ErrorCode::io, "save checkpoint: replacing '", final_dir, "' failed: ", std::strerror(errno));
  std::error_code ec;
  fs::remove_all(old, ec);
}

}  // namespace

const std::vector<std::string>& checkpoint_phases() {
  static const std::vector<std::string> p = {"start", "shards", "index", "publish", "tracker", "done"};
  return p;
}

SaveResult save_checkpoint(const std::string& dir, int64_t iteration, const MoEConfig& config,
                           const std::vector<Parameter*>& params_in, Optimizer* optimizer, const TrainingState& state,
                           std::shared_ptr<ProcessGroups> groups, const SaveOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!groups) groups = ProcessGroups::single();
  Communicator& world = groups->world();
  const int rank = world.rank();
  MOE_CHECK(!dir.empty(), "save_checkpoint: empty directory name");
  const std::string final_dir = checkpoint_iteration_dir(dir, iteration);
  const FailAt fail_at = fail_at_from_env();
  const std::string config_text = config_to_json(config);
  const ordered_json state_json = state_to_json(state);  // validates extra_json before any I/O
  SaveResult res;
  res.path = final_dir;
  auto phase = [&](const std::string& name) {
    if (fail_at.phase == name && (fail_at.rank < 0 || fail_at.rank == rank)) std::_Exit(75);
    if (options.fault_hook) options.fault_hook(name);
  };

  // 1. The temp directory.
  std::string nonce = rank == 0 ? hex_nonce() : std::string(16, '0');
  if (world.size() > 1) {
    Tensor t = Tensor::empty({16}, DType::u8);
    std::memcpy(t.data(), nonce.data(), 16);
    world.broadcast(t, 0);
    nonce.assign(static_cast<const char*>(t.data()), 16);
  }
  const std::string tmp = final_dir + ".tmp-" + nonce;
  Failure f;
  if (rank == 0)
    f.run([&] {
      std::error_code ec;
      fs::create_directories(dir, ec);
      MOE_CHECK_CODE(!ec, ErrorCode::io, "save_checkpoint: cannot create '", dir, "': ", ec.message());
      remove_stale(dir);
      MOE_CHECK_CODE(::mkdir(tmp.c_str(), 0755) == 0, ErrorCode::io, "save_checkpoint: cannot create '", tmp, "': ",
                     std::strerror(errno));
    });
  agree(world, f, "save_checkpoint");
  phase("start");

  // 2. What this rank holds.
  const std::vector<Parameter*> params = unique_params(params_in);
  std::vector<Item> items;
  for (Parameter* p : params) items.push_back(param_item(p, p->name, "param", p->value, 0, p->value.numel()));
  const bool with_optim = optimizer != nullptr && options.save_optim;
  if (with_optim)
    for (const OptimizerStateSlice& s : optimizer->state_slices())
      for (const StateKind& k : state_kinds()) {
        const Tensor& t = s.*(k.member);
        if (t.defined()) items.push_back(param_item(s.param, k.prefix + s.param->name, k.kind, t, s.begin, s.length));
      }

  // 3. Everyone's boxes. They are put in one order per tensor and each box is written minus every
  // box before it, which partitions the tensor whatever the order. The order: boxes by the lowest
  // rank holding them; the ranks holding the very same box (DP / CP / EDP / TP replicas) take turns
  // by a hash of the tensor and box, so replicated tensors spread over their holders.
  json meta = json::array();
  for (const Item& it : items) {
    json boxes = json::array();
    for (const Mapped& m : it.regions) boxes.push_back(box_json(m.box));
    meta.push_back({{"t", it.tensor}, {"k", it.kind}, {"p", it.param}, {"s", it.shape}, {"d", st_dtype_name(it.dtype)},
                    {"b", boxes}});
  }
  const std::vector<std::string> all_meta = all_gather_strings(world, meta.dump());
  struct TensorInfo {
    std::string kind, param;
    Shape shape;
    std::string dtype;
    int first_rank = -1;
  };
  struct Held {
    Box box;
    int rank = 0, seq = 0;  // seq: the box's position among this rank's boxes of the tensor
    int group_min = 0, turn = 0;
    bool operator<(const Held& o) const {
      if (group_min != o.group_min) return group_min < o.group_min;
      if (box.off != o.box.off) return box.off < o.box.off;
      if (box.len != o.box.len) return box.len < o.box.len;
      if (turn != o.turn) return turn < o.turn;
      return seq < o.seq;
    }
  };
  std::map<std::string, TensorInfo> infos;
  std::unordered_map<std::string, std::vector<Held>> held;
  for (int r = 0; r < static_cast<int>(all_meta.size()); ++r) {
    const json m = json::parse(all_meta[static_cast<size_t>(r)]);
    std::unordered_map<std::string, int> seq;
    for (const json& it : m) {
      const std::string t = it.at("t").get<std::string>();
      TensorInfo ti{it.at("k").get<std::string>(), it.at("p").get<std::string>(), it.at("s").get<Shape>(),
                    it.at("d").get<std::string>(), r};
      auto [pos, fresh] = infos.emplace(t, ti);
      MOE_CHECK_CODE(fresh || (pos->second.shape == ti.shape && pos->second.dtype == ti.dtype), ErrorCode::internal,
                     "save_checkpoint: tensor '", t, "' is ", shape_str(ti.shape), " ", ti.dtype, " on rank ", r,
                     " but ", shape_str(pos->second.shape), " ", pos->second.dtype, " on rank ",
                     pos->second.first_rank);
      for (const json& b : it.at("b")) held[t].push_back(Held{box_from(b), r, seq[t]++, 0, 0});
    }
  }
  for (auto& [t, list] : held) {
    std::map<std::pair<std::vector<int64_t>, std::vector<int64_t>>, std::vector<int>> holders;
    for (const Held& h : list) {
      std::vector<int>& v = holders[{h.box.off, h.box.len}];
      if (v.empty() || v.back() != h.rank) v.push_back(h.rank);  // ranks arrive in ascending order
    }
    for (Held& h : list) {
      const std::vector<int>& v = holders.at({h.box.off, h.box.len});
      const int n = static_cast<int>(v.size());
      const int pos = static_cast<int>(std::find(v.begin(), v.end(), h.rank) - v.begin());
      const int shift = static_cast<int>(crc32(t.data(), t.size(), crc32(h.box.str().data(), h.box.str().size())) %
                                         static_cast<uint32_t>(n));
      h.group_min = v.front();
      h.turn = (pos - shift + n) % n;
    }
    std::sort(list.begin(), list.end());
  }
  std::vector<Piece> pieces;
  std::unordered_map<std::string, int> my_seq;
  for (size_t i = 0; i < items.size(); ++i)
    for (const Mapped& m : items[i].regions) {
      const std::string& t = items[i].tensor;
      const int sq = my_seq[t]++;
      const std::vector<Held>& list = held.at(t);
      std::vector<Box> keep = {m.box};
      for (const Held& h : list) {
        if (h.rank == rank && h.seq == sq) break;  // everything before this box is subtracted
        if (!intersect(h.box, m.box, nullptr)) continue;
        std::vector<Box> next;
        for (const Box& k : keep) subtract(k, h.box, next);
        keep.swap(next);
        if (keep.empty()) break;
      }
      for (Box& b : keep) pieces.push_back(Piece{i, Mapped{std::move(b), m.shift}});
    }

  // 4. This rank's shard file.
  char fname[40];
  std::snprintf(fname, sizeof fname, "shard_r%05d.safetensors", rank);
  std::vector<WrittenSlice> written;
  uint64_t file_bytes = 0;
  f.run([&] {
    if (!pieces.empty()) file_bytes = write_shard(path_join(tmp, fname), items, pieces, written);
  });
  agree(world, f, "save_checkpoint");
  res.bytes_written += static_cast<int64_t>(file_bytes);
  res.slices_written = static_cast<int64_t>(written.size());
  phase("shards");

  // 5. The index (rank 0), from everyone's slice records.
  json rec = json::object();
  rec["file"] = pieces.empty() ? std::string() : std::string(fname);
  rec["bytes"] = file_bytes;
  json sl = json::array();
  for (const WrittenSlice& w : written)
    sl.push_back({{"t", w.tensor}, {"k", w.key}, {"b", box_json(w.box)}, {"o", {w.begin, w.end}}, {"c", w.crc}});
  rec["slices"] = sl;
  json rng_mine = json::object();
  if (options.save_rng)
    for (const auto& [k, v] : state.rng_states) rng_mine[k] = v;
  rec["rng"] = rng_mine;
  const std::vector<std::string> all_rec = all_gather_strings(world, rec.dump());
  if (rank == 0)
    f.run([&] {
      ordered_json ix = ordered_json::object();
      ix["format"] = kFormat;
      ix["version"] = kVersion;
      ix["iteration"] = iteration;
      ordered_json files = ordered_json::object();
      std::map<std::string, std::vector<ordered_json>> slices;
      std::map<std::string, int64_t> covered;
      ordered_json per_rank = ordered_json::array();
      for (size_t r = 0; r < all_rec.size(); ++r) {
        const json j = json::parse(all_rec[r]);
        const std::string file = j.at("file").get<std::string>();
        if (!file.empty()) files[file] = {{"bytes", j.at("bytes").get<uint64_t>()}, {"rank", r}};
        for (const json& s : j.at("slices")) {
          const std::string t = s.at("t").get<std::string>();
          const Box b = box_from(s.at("b"));
          ordered_json o = ordered_json::object();
          o["offsets"] = b.off;
          o["lengths"] = b.len;
          o["file"] = file;
          o["key"] = s.at("k").get<std::string>();
          o["data_offsets"] = s.at("o");
          o["crc32"] = s.at("c").get<uint32_t>();
          slices[t].push_back(std::move(o));
          covered[t] += b.numel();
        }
        per_rank.push_back(ordered_json::parse(j.at("rng").dump()));
      }
      ix["files"] = files;
      ordered_json tensors = ordered_json::object();
      for (const auto& [name, ti] : infos) {
        MOE_CHECK_CODE(covered[name] == shape_numel(ti.shape), ErrorCode::internal, "save_checkpoint: tensor '",
                       name, "' ", shape_str(ti.shape), " is covered by ", covered[name], " of ",
                       shape_numel(ti.shape), " elements over all ranks (no rank holds the rest)");
        auto& v = slices[name];
        std::sort(v.begin(), v.end(), [](const ordered_json& a, const ordered_json& b) {
          return a.at("offsets").get<std::vector<int64_t>>() < b.at("offsets").get<std::vector<int64_t>>();
        });
        ordered_json t = ordered_json::object();
        t["kind"] = ti.kind;
        t["param"] = ti.param;
        t["shape"] = ti.shape;
        t["dtype"] = ti.dtype;
        t["slices"] = v;
        tensors[name] = std::move(t);
      }
      ix["tensors"] = std::move(tensors);
      ix["training_state"] = state_json;
      ordered_json rng = ordered_json::object();
      rng["seed"] = state.seed;
      rng["saved"] = options.save_rng;
      rng["per_rank"] = options.save_rng ? per_rank : ordered_json::array();
      ix["rng"] = rng;
      ordered_json opt = ordered_json::object();
      opt["state_saved"] = with_optim;
      if (optimizer) {
        opt["optimizer"] = optimizer->config().optimizer;
        opt["iteration"] = optimizer->iteration();
        opt["skipped_iterations"] = optimizer->skipped_iterations();
        opt["use_distributed_optimizer"] = optimizer->config().use_distributed_optimizer;
      }
      ix["optimizer"] = opt;
      ix["config"] = ordered_json::parse(config_text);
      ix["layout"] = layout_json(*groups, optimizer, params);
      const std::string text = ix.dump(1);
      write_file_synced(path_join(tmp, kIndex), text);
      res.bytes_written += static_cast<int64_t>(text.size());
    });
  agree(world, f, "save_checkpoint");
  phase("index");

  // 6. Publish the directory, then the tracker.
  if (rank == 0)
    f.run([&] {
      fsync_dir(tmp);
      publish_dir(tmp, final_dir, nonce);
      fsync_dir(dir);
    });
  agree(world, f, "save_checkpoint");
  phase("publish");
  const std::string tracker = path_join(dir, kTracker), tracker_tmp = tracker + ".tmp-" + nonce;
  if (rank == 0) f.run([&] { write_file_synced(tracker_tmp, std::to_string(iteration)); });
  agree(world, f, "save_checkpoint");
  phase("tracker");
  if (rank == 0)
    f.run([&] {
      MOE_CHECK_CODE(::rename(tracker_tmp.c_str(), tracker.c_str()) == 0, ErrorCode::io, "save_checkpoint: renaming '",
                     tracker_tmp, "' to '", tracker, "' failed: ", std::strerror(errno));
      fsync_dir(dir);
      res.bytes_written += static_cast<int64_t>(std::to_string(iteration).size());
    });
  agree(world, f, "save_checkpoint");
  phase("done");
  res.seconds = seconds_since(t0);
  return res;
}

SaveResult save_checkpoint(const std::string& dir, int64_t iteration, MoEGPTModel& model, Optimizer* optimizer,
                           const TrainingState& state, std::shared_ptr<ProcessGroups> groups,
                           const SaveOptions& options) {
  return save_checkpoint(dir, iteration, model.config(), model.parameters(), optimizer, state, std::move(groups),
                         options);
}

// ---- load --------------------------------------------------------------------------------------------

namespace {

// The architecture keys a checkpoint must share with the run (shapes are checked tensor by tensor too).
std::vector<std::pair<std::string, std::string>> architecture(const MoEConfig& c0) {
  const MoEConfig c = resolve_model_config(c0);
  std::string freq;
  for (int64_t i = 0; i < c.num_layers; ++i) freq += c.is_moe_layer(i) ? '1' : '0';
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  auto i = [](int64_t v) { return std::to_string(v); };
  return {
      {"num_layers", i(c.num_layers)},
      {"hidden_size", i(c.hidden_size)},
      {"num_attention_heads", i(c.num_attention_heads)},
      {"num_query_groups", i(c.query_groups())},
      {"kv_channels", i(c.head_dim())},
      {"ffn_hidden_size", i(c.dense_ffn())},
      {"moe_ffn_hidden_size", i(c.moe_ffn_hidden_size)},
      {"num_moe_experts", i(c.num_moe_experts)},
      {"vocab_size", i(c.vocab_size)},
      {"normalization", c.normalization},
      {"position_embedding_type", c.position_embedding_type},
      {"qk_layernorm", b(c.qk_layernorm)},
      {"untie_embeddings_and_output_weights", b(c.untie_embeddings_and_output_weights)},
      {"moe_layer_freq (MoE layers)", freq},
      {"gated_linear_unit", b(c.gated_linear_unit)},
      {"activation_func", c.activation_func},
      {"moe_shared_expert_intermediate_size", i(c.moe_shared_expert_intermediate_size.value_or(0))},
      {"moe_shared_expert_gate", b(c.moe_shared_expert_gate)},
      {"moe_router_enable_expert_bias", b(c.moe_router_enable_expert_bias)},
  };
}

// A destination: a host array this rank holds, the boxes it covers, and where they come from.
struct Dest {
  const TensorRec* src = nullptr;
  std::string what;  // for errors
  HostView view;
  std::vector<Mapped> regions;
};
struct Task {
  size_t dest, region;
  Box box;
};

}  // namespace

LoadResult load_checkpoint(const std::string& dir, const MoEConfig& config, const std::vector<Parameter*>& params_in,
                           Optimizer* optimizer, std::shared_ptr<ProcessGroups> groups, const LoadOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!groups) groups = ProcessGroups::single();
  Communicator& world = groups->world();
  const int rank = world.rank();
  LoadResult res;
  const bool load_optim = optimizer != nullptr && !options.finetune && !options.no_load_optim;
  const bool load_rng = !options.finetune && !options.no_load_rng;
  const std::vector<Parameter*> params = unique_params(params_in);

  // 1. The index, the model check and the plan.
  Index ix;
  std::vector<Dest> dests;
  std::vector<std::pair<Tensor, Tensor>> staged;  // (device tensor, its host copy): loaded through the host
  Failure f;
  f.run([&] {
    ix = read_index(dir, options.iteration);
    res.iteration = ix.iteration;
    res.path = ix.dir;
    const std::string where = "load checkpoint '" + ix.dir + "'";
    // Architecture keys.
    MoEConfig saved;
    bool comparable = true;
    try {
      saved = config_from_json(ix.config.dump(), where + " config");
    } catch (const Error& e) {
      comparable = false;
      res.notes.push_back("the saved config could not be read (" + e.detail() + "); only tensor shapes were compared");
    }
    if (comparable) {
      const auto a = architecture(saved), b = architecture(config);
      std::string diffs;
      for (size_t k = 0; k < a.size(); ++k)
        if (a[k].second != b[k].second)
          diffs += "\n  " + a[k].first + " = " + a[k].second + " in the checkpoint, " + b[k].second + " in this run";
      MOE_CHECK(diffs.empty(), where, ": the checkpoint is of another model:", diffs);
    }
    // A host array to load into: the tensor itself on the CPU, else a copy written back at the end.
    auto host_target = [&](const Tensor& t) {
      if (t.device().is_cpu()) return t;
      staged.emplace_back(t, Tensor::empty(t.shape(), t.dtype()));
      return staged.back().second;
    };
    // Parameters.
    auto find = [&](const std::string& name, const std::string& kind) -> const TensorRec* {
      auto it = ix.tensors.find(name);
      if (it == ix.tensors.end()) return nullptr;
      MOE_CHECK(it->second.kind == kind, where, ": tensor '", name, "' is a ", it->second.kind, ", expected a ", kind);
      return &it->second;
    };
    auto add = [&](Parameter* p, const TensorRec* src, const Tensor& dst, int64_t begin, int64_t length,
                   const std::string& what) {
      MOE_CHECK(src->shape == p->canonical_shape, where, ": tensor '", src->name, "' has shape ", shape_str(src->shape),
                " in the checkpoint, ", shape_str(p->canonical_shape), " in this model (another model?)");
      Dest d;
      d.src = src;
      d.what = what;
      d.view = HostView{static_cast<char*>(dst.data()), dst.dtype(), shard_shape(p->canonical_shape, p->shard), begin,
                        length};
      d.regions = local_regions(p->canonical_shape, p->shard, begin, begin + length);
      dests.push_back(std::move(d));
    };
    for (Parameter* p : params) {
      const TensorRec* src = find(p->name, "param");
      MOE_CHECK(src != nullptr, where, ": the checkpoint has no tensor '", p->name, "' ", shape_str(p->canonical_shape),
                " that this model has (another model?)");
      // An f32 parameter is its own master: take the saved f32 master when there is one.
      if (p->value.dtype() == DType::f32 && load_optim)
        if (const TensorRec* m = find(kMasterPrefix + p->name, "fp32_param")) src = m;
      add(p, src, host_target(p->value), 0, p->value.numel(), "parameter '" + p->name + "'");
    }
    if (load_optim) {
      const json& o = ix.optimizer;
      MOE_CHECK(o.value("state_saved", false), where,
                ": the checkpoint holds no optimizer state (saved without it, or imported): load with finetune or "
                "no_load_optim (--finetune / --no-load-optim)");
      const std::string saved_opt = o.value("optimizer", std::string());
      MOE_CHECK(saved_opt == optimizer->config().optimizer, where, ": optimizer state of '", saved_opt,
                "', this run uses '", optimizer->config().optimizer, "' (load with no_load_optim to start it afresh)");
      for (const OptimizerStateSlice& s : optimizer->state_slices())
        for (const StateKind& k : state_kinds()) {
          const Tensor& t = s.*(k.member);
          if (!t.defined()) continue;
          const TensorRec* src = find(k.prefix + s.param->name, k.kind);
          if (!src && std::string(k.kind) == "fp32_param") src = find(s.param->name, "param");  // f32 parameters
          MOE_CHECK(src != nullptr, where, ": the checkpoint has no '", k.prefix, s.param->name,
                    "' (saved with other optimizer settings?): load with no_load_optim");
          add(s.param, src, host_target(t), s.begin, s.length, std::string(k.kind) + " of '" + s.param->name + "'");
        }
    }
  });
  agree(world, f, "load_checkpoint");

  // 2. Every parameter of the checkpoint must be held by some rank (else it is another model).
  std::vector<std::string> names;
  for (const auto& [n, t] : ix.tensors)
    if (t.kind == "param") names.push_back(n);
  {
    std::set<std::string> held;
    for (Parameter* p : params) held.insert(p->name);
    std::vector<int32_t> mark(names.size());
    for (size_t i = 0; i < names.size(); ++i) mark[i] = held.count(names[i]) ? 1 : 0;
    if (!mark.empty()) {
      Tensor t = Tensor::from_vector(mark, {static_cast<int64_t>(mark.size())});
      if (world.size() > 1) world.all_reduce(t, ReduceOp::max);
      mark = t.to_vector<int32_t>();
    }
    std::string extra;
    for (size_t i = 0; i < names.size(); ++i)
      if (!mark[i]) extra += (extra.empty() ? "" : ", ") + names[i];
    MOE_CHECK(extra.empty(), "load checkpoint '", ix.dir, "': the checkpoint has tensors this model does not: ", extra,
              " (another model?)");
  }

  // 3. Intersections, by file and slice; every file's size before any payload is read.
  std::map<std::string, std::map<const SliceRec*, std::vector<Task>>> plan;
  f.run([&] {
    for (size_t di = 0; di < dests.size(); ++di) {
      const Dest& d = dests[di];
      for (size_t ri = 0; ri < d.regions.size(); ++ri) {
        int64_t covered = 0;
        for (const SliceRec& s : d.src->slices) {
          Box I;
          if (!intersect(s.box, d.regions[ri].box, &I)) continue;
          covered += I.numel();
          plan[s.file][&s].push_back(Task{di, ri, I});
        }
        MOE_CHECK(covered == d.regions[ri].box.numel(), "load checkpoint '", ix.dir,
                  "': the index does not cover tensor '", d.src->name, "' ", d.regions[ri].box.str(), ": ", covered,
                  " of ", d.regions[ri].box.numel(), " elements");
      }
    }
    for (const auto& [file, slices] : plan) {
      const std::string path = path_join(ix.dir, file);
      struct stat st {};
      MOE_CHECK(::stat(path.c_str(), &st) == 0, "load checkpoint: shard file '", path, "' is missing (",
                slices.size(), " slices of this rank's tensors, e.g. '", slices.begin()->first->key, "')");
      MOE_CHECK(static_cast<uint64_t>(st.st_size) == ix.file_bytes.at(file), "load checkpoint: shard file '", path,
                "' is ", st.st_size, " bytes, the index says ", ix.file_bytes.at(file),
                static_cast<uint64_t>(st.st_size) < ix.file_bytes.at(file) ? " (truncated)" : "");
    }
    // 4. Read and place.
    for (const auto& [file, slices] : plan) {
      ShardFile sf(path_join(ix.dir, file), ix.file_bytes.at(file));
      ++res.files_opened;
      for (const auto& [s, tasks] : slices) {
        const TensorRec& t = *dests[tasks.front().dest].src;
        std::vector<char> buf = sf.read(*s, t);
        HostView src{buf.data(), t.dtype, s->box.len, 0, s->box.numel()};
        for (const Task& k : tasks) {
          const Dest& d = dests[k.dest];
          copy_box(k.box, src, s->box.off, d.view, d.regions[k.region].shift);
        }
      }
      res.bytes_read += static_cast<int64_t>(sf.bytes_read());
    }
    for (auto& [dev, host] : staged) dev.copy_from(host);
  });
  agree(world, f, "load_checkpoint");

  // 5. Counters, generators, the state.
  res.optimizer_loaded = load_optim;
  if (optimizer) {
    if (load_optim)
      optimizer->set_iteration(ix.optimizer.value("iteration", int64_t{0}),
                               ix.optimizer.value("skipped_iterations", int64_t{0}));
    else
      optimizer->reload_model_params();
  }
  const bool same_world = ix.layout.value("world_size", int64_t{-1}) == world.size();
  res.state = state_from_json(ix.training_state, ix.rng, same_world ? rank : 0);
  const bool rng_saved = ix.rng.value("saved", false);
  res.rng_loaded = load_rng && rng_saved;
  if (res.rng_loaded && !same_world)
    res.notes.push_back("generator states were saved by " + std::to_string(ix.layout.value("world_size", int64_t{0})) +
                        " ranks and this run has " + std::to_string(world.size()) + ": every rank takes rank 0's");
  if (!res.rng_loaded) res.state.rng_states.clear();
  if (options.finetune) {
    res.state.iteration = 0;
    res.state.consumed_train_samples = res.state.consumed_valid_samples = 0;
    res.state.train_data_position = res.state.valid_data_position = 0;
    res.state.scheduler.num_steps = 0;
  }
  res.saved_config_json = ix.config.dump(2);
  res.saved_layout_json = ix.layout.dump();
  res.bytes_read += static_cast<int64_t>(ix.index_bytes);
  res.seconds = seconds_since(t0);
  return res;
}

LoadResult load_checkpoint(const std::string& dir, MoEGPTModel& model, Optimizer* optimizer,
                           std::shared_ptr<ProcessGroups> groups, const LoadOptions& options) {
  return load_checkpoint(dir, model.config(), model.parameters(), optimizer, std::move(groups), options);
}

}  // namespace moe

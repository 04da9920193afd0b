// checkpoint/torch_file.cpp: the zip directory, the restricted unpickler and storage reads.
//
// The unpickler keeps the pickle machine's stack, mark stack and memo, but its values are inert
// descriptions (PyValue): a GLOBAL is looked up in the allowlist and becomes a name, REDUCE of an
// allowed name builds the described value (an empty dict, a tensor reference, an inert object)
// and anything else stops the parse. Layout facts come from pytorch's serialization code
// (torch/serialization.py _save/_load, torch/_utils.py _rebuild_tensor_v2) and the zip spec.
#include "checkpoint/torch_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "core/error.h"

namespace loom::checkpoint {

const char* torch_dtype_name(TorchDType t) {
  switch (t) {
    case TorchDType::f64: return "float64";
    case TorchDType::f32: return "float32";
    case TorchDType::f16: return "float16";
    case TorchDType::bf16: return "bfloat16";
    case TorchDType::i64: return "int64";
    case TorchDType::i32: return "int32";
    case TorchDType::i16: return "int16";
    case TorchDType::i8: return "int8";
    case TorchDType::u8: return "uint8";
    case TorchDType::boolean: return "bool";
  }
  return "?";
}

size_t torch_dtype_size(TorchDType t) {
  switch (t) {
    case TorchDType::f64: case TorchDType::i64: return 8;
    case TorchDType::f32: case TorchDType::i32: return 4;
    case TorchDType::f16: case TorchDType::bf16: case TorchDType::i16: return 2;
    default: return 1;
  }
}

int64_t TorchTensorRef::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const char* py_kind_name(PyValue::Kind k) {
  switch (k) {
    case PyValue::Kind::none: return "None";
    case PyValue::Kind::boolean: return "bool";
    case PyValue::Kind::integer: return "int";
    case PyValue::Kind::floating: return "float";
    case PyValue::Kind::string: return "str";
    case PyValue::Kind::bytes: return "bytes";
    case PyValue::Kind::tuple: return "tuple";
    case PyValue::Kind::list: return "list";
    case PyValue::Kind::dict: return "dict";
    case PyValue::Kind::global: return "global";
    case PyValue::Kind::storage: return "storage";
    case PyValue::Kind::tensor: return "tensor";
    case PyValue::Kind::object: return "object";
    case PyValue::Kind::dtype: return "dtype";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler
namespace {

constexpr size_t kMaxStack = 1 << 20;
constexpr size_t kMaxMemo = 1 << 20;  // a 13B state dict uses ~10^4 entries
constexpr int kMaxDepth = 64;

struct StorageKind {
  const char* cls;
  TorchDType dtype;
};
constexpr StorageKind kStorages[] = {
    {"DoubleStorage", TorchDType::f64}, {"FloatStorage", TorchDType::f32},
    {"HalfStorage", TorchDType::f16},   {"BFloat16Storage", TorchDType::bf16},
    {"LongStorage", TorchDType::i64},   {"IntStorage", TorchDType::i32},
    {"ShortStorage", TorchDType::i16},  {"CharStorage", TorchDType::i8},
    {"ByteStorage", TorchDType::u8},    {"BoolStorage", TorchDType::boolean}};
const std::set<std::string> kTorchDtypes = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool",    "double",  "float",   "half",     "long",  "int",   "short", "complex64"};

PyRef make(PyValue::Kind k) {
  auto v = std::make_shared<PyValue>();
  v->kind = k;
  return v;
}

class Unpickler {
 public:
  Unpickler(std::string_view b, const std::string& src) : buf_(b), src_(src) {}

  PyRef run() {
    while (true) {
      LOOM_CHECK(pos_ < buf_.size(), "{}: data.pkl ends at byte {} without a STOP opcode "
                 "(truncated file?)", src_, pos_);
      const size_t at = pos_;
      const uint8_t op = u8();
      switch (op) {
        case 0x80: u8(); break;  // PROTO
        case 0x95: take(8); break;  // FRAME (protocol 4): a length hint only
        case '.': {  // STOP
          LOOM_CHECK(stack_.size() == 1, "{}: malformed pickle: {} values on the stack at STOP",
                     src_, stack_.size());
          return stack_.back();
        }
        case 'c': {  // GLOBAL module\nname\n
          std::string mod = line(), name = line();
          push(resolve_global(mod, name, at));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          PyRef name = pop(), mod = pop();
          LOOM_CHECK(mod->kind == PyValue::Kind::string && name->kind == PyValue::Kind::string,
                     "{}: STACK_GLOBAL at byte {} needs two strings", src_, at);
          push(resolve_global(mod->s, name->s, at));
          break;
        }
        case 'q': memo_put(u8()); break;
        case 'r': memo_put(u32()); break;
        case 0x94: memo_put(memo_.size()); break;  // MEMOIZE
        case 'h': push(memo_get(u8(), at)); break;
        case 'j': push(memo_get(u32(), at)); break;
        case '(': marks_.push_back(stack_.size()); break;
        case ')': push(make(PyValue::Kind::tuple)); break;
        case 't': { auto t = make(PyValue::Kind::tuple); t->items = pop_mark(at); push(t); break; }
        case 0x85: case 0x86: case 0x87: {
          auto t = make(PyValue::Kind::tuple);
          t->items.resize(size_t(op - 0x84));
          for (size_t i = t->items.size(); i-- > 0;) t->items[i] = pop();
          push(t);
          break;
        }
        case '}': push(make(PyValue::Kind::dict)); break;
        case ']': push(make(PyValue::Kind::list)); break;
        case 'l': { auto l = make(PyValue::Kind::list); l->items = pop_mark(at); push(l); break; }
        case 'd': {
          auto d = make(PyValue::Kind::dict);
          set_items(d, pop_mark(at), at);
          push(d);
          break;
        }
        case 's': {
          PyRef v = pop(), k = pop();
          set_items(top(), {k, v}, at);
          break;
        }
        case 'u': { auto kv = pop_mark(at); set_items(top(), kv, at); break; }
        case 'a': {
          PyRef v = pop();
          PyRef l = top();
          LOOM_CHECK(l->kind == PyValue::Kind::list, "{}: APPEND at byte {} to a {}", src_, at,
                     py_kind_name(l->kind));
          l->items.push_back(v);
          break;
        }
        case 'e': {
          auto vs = pop_mark(at);
          PyRef l = top();
          LOOM_CHECK(l->kind == PyValue::Kind::list, "{}: APPENDS at byte {} to a {}", src_, at,
                     py_kind_name(l->kind));
          l->items.insert(l->items.end(), vs.begin(), vs.end());
          break;
        }
        case '0': pop(); break;  // POP
        case '1': pop_mark(at); break;  // POP_MARK
        case '2': push(top()); break;   // DUP
        case 'X': push_str(PyValue::Kind::string, u32()); break;
        case 0x8c: push_str(PyValue::Kind::string, u8()); break;  // SHORT_BINUNICODE
        case 'T': push_str(PyValue::Kind::string, u32()); break;  // BINSTRING
        case 'U': push_str(PyValue::Kind::string, u8()); break;   // SHORT_BINSTRING
        case 'B': push_str(PyValue::Kind::bytes, u32()); break;   // BINBYTES
        case 'C': push_str(PyValue::Kind::bytes, u8()); break;    // SHORT_BINBYTES
        case 'K': push_int(u8()); break;
        case 'M': { uint32_t lo = u8(); push_int(int64_t(lo | uint32_t(u8()) << 8)); break; }
        case 'J': push_int(int64_t(int32_t(u32()))); break;
        case 0x8a: {  // LONG1: n-byte little-endian two's complement
          const size_t n = u8();
          LOOM_CHECK(n <= 8, "{}: LONG1 of {} bytes at byte {}: integers wider than 64 bits are "
                     "not part of a state dict", src_, n, at);
          const std::string_view b = take(n);
          uint64_t v = 0;
          for (size_t i = 0; i < n; ++i) v |= uint64_t(uint8_t(b[i])) << (8 * i);
          if (n > 0 && n < 8 && (uint8_t(b[n - 1]) & 0x80)) v |= ~uint64_t(0) << (8 * n);
          push_int(int64_t(v));
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          const std::string_view b = take(8);
          uint64_t v = 0;
          for (size_t i = 0; i < 8; ++i) v = v << 8 | uint8_t(b[i]);
          auto f = make(PyValue::Kind::floating);
          std::memcpy(&f->f, &v, 8);
          push(f);
          break;
        }
        case 0x88: case 0x89: {
          auto b = make(PyValue::Kind::boolean);
          b->b = op == 0x88;
          push(b);
          break;
        }
        case 'N': push(make(PyValue::Kind::none)); break;
        case 'Q': push(persistent_load(pop(), at)); break;  // BINPERSID
        case 'R': {  // REDUCE
          PyRef args = pop(), fn = pop();
          push(reduce(fn, args, at));
          break;
        }
        case 0x81: {  // NEWOBJ
          PyRef args = pop(), cls = pop();
          LOOM_CHECK(cls->kind == PyValue::Kind::global && cls->s == "argparse.Namespace",
                     "{}: refusing to load: NEWOBJ of {} at byte {} (only argparse.Namespace "
                     "objects are read, inertly); nothing was executed", src_, describe(cls), at);
          auto o = make(PyValue::Kind::object);
          o->s = cls->s;
          push(o);
          break;
        }
        case 'b': {  // BUILD: set state; inert (kept on objects, ignored on dicts and tensors)
          PyRef state = pop();
          PyRef obj = top();
          if (obj->kind == PyValue::Kind::object) obj->state = state;
          else LOOM_CHECK(obj->kind == PyValue::Kind::dict || obj->kind == PyValue::Kind::tensor,
                          "{}: refusing to load: BUILD on a {} at byte {}", src_,
                          py_kind_name(obj->kind), at);
          break;
        }
        default: {
          const char* what = op == 'i' ? "INST" : op == 'o' ? "OBJ" : op == 'P' ? "PERSID"
                           : (op >= 0x82 && op <= 0x84) ? "EXT" : op == 0x92 ? "NEWOBJ_EX"
                                                                             : "unknown";
          LOOM_FAIL("{}: refusing to load: pickle opcode 0x{:02x} ({}) at byte {} is outside "
                    "what a state dict uses; nothing was executed", src_, op, what, at);
        }
      }
    }
  }

 private:
  uint8_t u8() {
    LOOM_CHECK(pos_ < buf_.size(), "{}: data.pkl is truncated at byte {}", src_, pos_);
    return uint8_t(buf_[pos_++]);
  }
  uint32_t u32() {
    const std::string_view b = take(4);
    return uint32_t(uint8_t(b[0])) | uint32_t(uint8_t(b[1])) << 8 | uint32_t(uint8_t(b[2])) << 16 |
           uint32_t(uint8_t(b[3])) << 24;
  }
  std::string_view take(size_t n) {
    LOOM_CHECK(n <= buf_.size() - pos_, "{}: data.pkl is truncated: {} bytes needed at byte {}, "
               "{} left", src_, n, pos_, buf_.size() - pos_);
    std::string_view r = buf_.substr(pos_, n);
    pos_ += n;
    return r;
  }
  std::string line() {
    const size_t nl = buf_.find('\n', pos_);
    LOOM_CHECK(nl != std::string_view::npos && nl - pos_ < 256,
               "{}: malformed GLOBAL name at byte {}", src_, pos_);
    std::string s(buf_.substr(pos_, nl - pos_));
    pos_ = nl + 1;
    return s;
  }
  void push(PyRef v) {
    LOOM_CHECK(stack_.size() < kMaxStack, "{}: pickle stack exceeds {} values", src_, kMaxStack);
    stack_.push_back(std::move(v));
  }
  PyRef pop() {
    LOOM_CHECK(!stack_.empty() && (marks_.empty() || stack_.size() > marks_.back()),
               "{}: malformed pickle: pop from an empty stack at byte {}", src_, pos_);
    PyRef v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  PyRef top() {
    LOOM_CHECK(!stack_.empty(), "{}: malformed pickle: empty stack at byte {}", src_, pos_);
    return stack_.back();
  }
  std::vector<PyRef> pop_mark(size_t at) {
    LOOM_CHECK(!marks_.empty(), "{}: malformed pickle: no MARK for the opcode at byte {}", src_,
               at);
    const size_t m = marks_.back();
    marks_.pop_back();
    LOOM_CHECK(m <= stack_.size(), "{}: malformed pickle at byte {}", src_, at);
    std::vector<PyRef> r(stack_.begin() + std::ptrdiff_t(m), stack_.end());
    stack_.resize(m);
    return r;
  }
  void memo_put(size_t idx) {
    LOOM_CHECK(idx < kMaxMemo, "{}: memo index {} too large", src_, idx);
    if (memo_.size() <= idx) memo_.resize(idx + 1);
    memo_[idx] = top();
  }
  PyRef memo_get(size_t idx, size_t at) {
    LOOM_CHECK(idx < memo_.size() && memo_[idx], "{}: malformed pickle: memo entry {} read at "
               "byte {} was never stored", src_, idx, at);
    return memo_[idx];
  }
  void push_str(PyValue::Kind k, size_t n) {
    auto v = make(k);
    v->s = std::string(take(n));
    push(v);
  }
  void push_int(int64_t i) {
    auto v = make(PyValue::Kind::integer);
    v->i = i;
    push(v);
  }
  void set_items(const PyRef& d, const std::vector<PyRef>& kv, size_t at) {
    LOOM_CHECK(d->kind == PyValue::Kind::dict, "{}: SETITEM(S) at byte {} on a {}", src_, at,
               py_kind_name(d->kind));
    LOOM_CHECK(kv.size() % 2 == 0, "{}: SETITEMS at byte {} with an odd item count", src_, at);
    for (size_t i = 0; i < kv.size(); i += 2) d->entries.emplace_back(kv[i], kv[i + 1]);
  }
  std::string describe(const PyRef& v) const {
    return v->kind == PyValue::Kind::global ? "'" + v->s + "'" : std::string("a ") + py_kind_name(v->kind);
  }

  PyRef resolve_global(const std::string& mod, const std::string& name, size_t at) {
    const std::string full = mod + "." + name;
    auto g = make(PyValue::Kind::global);
    g->s = full;
    if (full == "collections.OrderedDict" || full == "torch._utils._rebuild_tensor_v2" ||
        full == "torch._utils._rebuild_parameter" ||
        full == "torch._utils._rebuild_parameter_with_state" ||
        full == "torch._tensor._rebuild_from_type_v2" || full == "torch.Tensor" ||
        full == "torch.nn.parameter.Parameter" || full == "argparse.Namespace")
      return g;
    if (mod == "torch") {
      for (const auto& sk : kStorages)
        if (name == sk.cls) return g;
      if (kTorchDtypes.count(name)) {
        auto d = make(PyValue::Kind::dtype);
        d->s = name;
        return d;
      }
    }
    LOOM_FAIL("{}: refusing to load: the pickle references the global '{}' (byte {}), which is "
              "not on loom's allowlist (OrderedDict, torch tensor/parameter rebuild, torch "
              "storages and dtypes, argparse.Namespace); nothing was executed. Re-save a plain "
              "state dict of tensors if the file is yours.", src_, full, at);
  }

  PyRef persistent_load(const PyRef& pid, size_t at) {
    const auto& it = pid->items;
    LOOM_CHECK(pid->kind == PyValue::Kind::tuple && it.size() == 5 &&
                   it[0]->kind == PyValue::Kind::string && it[0]->s == "storage" &&
                   it[1]->kind == PyValue::Kind::global && it[2]->kind == PyValue::Kind::string &&
                   it[4]->kind == PyValue::Kind::integer,
               "{}: refusing to load: persistent id at byte {} is not a ('storage', type, key, "
               "location, numel) record", src_, at);
    const std::string cls = it[1]->s.substr(it[1]->s.rfind('.') + 1);
    auto s = make(PyValue::Kind::storage);
    bool found = false;
    for (const auto& sk : kStorages)
      if (cls == sk.cls) {
        s->tensor.dtype = sk.dtype;
        found = true;
      }
    LOOM_CHECK(found, "{}: refusing to load: storage type '{}' at byte {} is not a torch "
               "storage class", src_, it[1]->s, at);
    LOOM_CHECK(it[4]->i >= 0, "{}: storage '{}' has negative size {}", src_, it[2]->s, it[4]->i);
    s->tensor.storage_key = it[2]->s;
    s->tensor.storage_numel = it[4]->i;
    return s;
  }

  std::vector<int64_t> int_tuple(const PyRef& v, const char* what, size_t at) {
    LOOM_CHECK(v->kind == PyValue::Kind::tuple || v->kind == PyValue::Kind::list,
               "{}: tensor {} at byte {} is a {}, not a tuple", src_, what, at,
               py_kind_name(v->kind));
    LOOM_CHECK(v->items.size() <= 16, "{}: tensor at byte {} has {} dimensions", src_, at,
               v->items.size());
    std::vector<int64_t> r;
    for (const PyRef& x : v->items) {
      LOOM_CHECK(x->kind == PyValue::Kind::integer && x->i >= 0 && x->i < (int64_t(1) << 40),
                 "{}: tensor {} at byte {} has an invalid entry", src_, what, at);
      r.push_back(x->i);
    }
    return r;
  }

  PyRef reduce(const PyRef& fn, const PyRef& args, size_t at) {
    LOOM_CHECK(fn->kind == PyValue::Kind::global,
               "{}: refusing to load: REDUCE at byte {} calls {} (only allowlisted globals can "
               "be reduced); nothing was executed", src_, at, describe(fn));
    LOOM_CHECK(args->kind == PyValue::Kind::tuple, "{}: REDUCE at byte {}: arguments of '{}' are "
               "a {}, not a tuple", src_, at, fn->s, py_kind_name(args->kind));
    const auto& a = args->items;
    if (fn->s == "collections.OrderedDict") {
      LOOM_CHECK(a.empty(), "{}: OrderedDict at byte {} built from arguments", src_, at);
      return make(PyValue::Kind::dict);
    }
    if (fn->s == "argparse.Namespace") {
      auto o = make(PyValue::Kind::object);
      o->s = fn->s;
      return o;
    }
    if (fn->s == "torch._tensor._rebuild_from_type_v2") {
      // (func, new_type, args, state): a tensor subclass wrapper (newer torch writes Parameters
      // this way). Only plain tensors and Parameters, built by an allowed rebuild function.
      LOOM_CHECK(a.size() >= 3 && a[0]->kind == PyValue::Kind::global &&
                     a[1]->kind == PyValue::Kind::global &&
                     (a[1]->s == "torch.Tensor" || a[1]->s == "torch.nn.parameter.Parameter") &&
                     a[0]->s.rfind("torch._utils._rebuild_", 0) == 0,
                 "{}: refusing to load: _rebuild_from_type_v2 at byte {} wraps something other "
                 "than a tensor or Parameter rebuild; nothing was executed", src_, at);
      return reduce(a[0], a[2], at);
    }
    if (fn->s == "torch._utils._rebuild_parameter" ||
        fn->s == "torch._utils._rebuild_parameter_with_state") {
      LOOM_CHECK(a.size() >= 1 && a[0]->kind == PyValue::Kind::tensor,
                 "{}: _rebuild_parameter at byte {} without a tensor", src_, at);
      return a[0];
    }
    if (fn->s == "torch._utils._rebuild_tensor_v2") {
      LOOM_CHECK(a.size() >= 4 && a[0]->kind == PyValue::Kind::storage &&
                     a[1]->kind == PyValue::Kind::integer,
                 "{}: _rebuild_tensor_v2 at byte {}: expected (storage, offset, size, stride, "
                 "...)", src_, at);
      auto t = make(PyValue::Kind::tensor);
      t->tensor = a[0]->tensor;
      LOOM_CHECK(a[1]->i >= 0, "{}: tensor at byte {} has negative storage offset", src_, at);
      t->tensor.storage_offset = a[1]->i;
      t->tensor.shape = int_tuple(a[2], "size", at);
      t->tensor.stride = int_tuple(a[3], "stride", at);
      LOOM_CHECK(t->tensor.shape.size() == t->tensor.stride.size(),
                 "{}: tensor at byte {} has {} sizes but {} strides", src_, at,
                 t->tensor.shape.size(), t->tensor.stride.size());
      int64_t numel = 1;
      for (int64_t d : t->tensor.shape)
        LOOM_CHECK(!__builtin_mul_overflow(numel, d, &numel) && numel < (int64_t(1) << 48),
                   "{}: tensor at byte {} has an impossible size", src_, at);
      return t;
    }
    LOOM_FAIL("{}: refusing to load: REDUCE at byte {} calls '{}', which does not build a "
              "tensor or a dict; nothing was executed", src_, at, fn->s);
  }

  std::string_view buf_;
  const std::string& src_;
  size_t pos_ = 0;
  std::vector<PyRef> stack_, memo_;
  std::vector<size_t> marks_;
};

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }
uint32_t rd32(const uint8_t* p) { return uint32_t(rd16(p)) | uint32_t(rd16(p + 2)) << 16; }
uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | uint64_t(rd32(p + 4)) << 32; }

void pread_all(int fd, void* dst, uint64_t n, uint64_t off, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, size_t(std::min<uint64_t>(n, 1u << 30)), off_t(off));
    if (r < 0 && errno == EINTR) continue;
    LOOM_CHECK(r > 0, "'{}': read of {} bytes at offset {} failed: {}", path, n, off,
               r < 0 ? std::strerror(errno) : "unexpected end of file");
    p += r;
    n -= uint64_t(r);
    off += uint64_t(r);
  }
}

}  // namespace

PyRef unpickle_restricted(std::string_view bytes, const std::string& source) {
  return Unpickler(bytes, source).run();
}

// ---------------------------------------------------------------------------------------------
// Zip
TorchFile::TorchFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd_ >= 0, "cannot open '{}': {}", path, std::strerror(errno));
  try {
    const off_t end = ::lseek(fd_, 0, SEEK_END);
    LOOM_CHECK(end >= 0, "'{}': lseek failed: {}", path, std::strerror(errno));
    file_size_ = uint64_t(end);
    uint8_t magic[4] = {0, 0, 0, 0};
    if (file_size_ >= 4) pread_all(fd_, magic, 4, 0, path);
    if (!(magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4)) {
      const bool legacy = magic[0] == 0x80 && magic[1] == 0x02 && magic[2] == 0x8a;
      LOOM_CHECK(!legacy,
                 "'{}' is a legacy (pre-1.6, non-zip) torch.save file, which loom does not read. "
                 "Re-save it once in the zip format with PyTorch >= 1.6: python3 -c \"import "
                 "torch; torch.save(torch.load('{}', map_location='cpu'), 'resaved.pt')\" (only do "
                 "this with a file you trust: torch.load runs its pickle)", path, path);
      LOOM_FAIL("'{}' is not a PyTorch zip checkpoint (no zip header; first bytes {:02x} {:02x} "
                "{:02x} {:02x})", path, magic[0], magic[1], magic[2], magic[3]);
    }
    // End of central directory: within the last 64 KiB + 22 bytes.
    const uint64_t tail = std::min<uint64_t>(file_size_, 65536 + 22);
    std::vector<uint8_t> t(tail);
    pread_all(fd_, t.data(), tail, file_size_ - tail, path);
    int64_t eocd = -1;
    for (int64_t i = int64_t(tail) - 22; i >= 0; --i)
      if (rd32(&t[size_t(i)]) == 0x06054b50u) {
        eocd = i;
        break;
      }
    LOOM_CHECK(eocd >= 0, "'{}': zip end-of-directory record not found: the file is truncated or "
               "not a zip", path);
    const uint8_t* e = &t[size_t(eocd)];
    uint64_t n_entries = rd16(e + 10), cd_size = rd32(e + 12), cd_off = rd32(e + 16);
    const uint64_t eocd_abs = file_size_ - tail + uint64_t(eocd);
    if ((n_entries == 0xffff || cd_size == 0xffffffffu || cd_off == 0xffffffffu) && eocd_abs >= 20) {
      uint8_t loc[20];
      pread_all(fd_, loc, 20, eocd_abs - 20, path);
      LOOM_CHECK(rd32(loc) == 0x07064b50u, "'{}': ZIP64 locator missing", path);
      const uint64_t z64 = rd64(loc + 8);
      LOOM_CHECK(z64 + 56 <= file_size_, "'{}': ZIP64 record offset {} beyond the file", path, z64);
      uint8_t z[56];
      pread_all(fd_, z, 56, z64, path);
      LOOM_CHECK(rd32(z) == 0x06064b50u, "'{}': ZIP64 end record corrupt", path);
      n_entries = rd64(z + 32);
      cd_size = rd64(z + 40);
      cd_off = rd64(z + 48);
    }
    LOOM_CHECK(cd_off <= file_size_ && cd_size <= file_size_ - cd_off && cd_size < (1u << 30) &&
                   n_entries <= cd_size / 46,
               "'{}': zip central directory ({} entries, {} bytes at {}) does not fit the file "
               "of {} bytes: truncated or corrupt", path, n_entries, cd_size, cd_off, file_size_);
    std::vector<uint8_t> cd(cd_size);
    pread_all(fd_, cd.data(), cd_size, cd_off, path);
    size_t p = 0;
    for (uint64_t k = 0; k < n_entries; ++k) {
      LOOM_CHECK(p + 46 <= cd.size() && rd32(&cd[p]) == 0x02014b50u,
                 "'{}': zip central directory entry {} is corrupt", path, k);
      const uint8_t* h = &cd[p];
      const uint16_t method = rd16(h + 10), nlen = rd16(h + 28), xlen = rd16(h + 30),
                     clen = rd16(h + 32);
      uint64_t csize = rd32(h + 20), usize = rd32(h + 24), loff = rd32(h + 42);
      LOOM_CHECK(p + 46 + nlen + xlen + clen <= cd.size(), "'{}': zip entry {} overruns the "
                 "directory", path, k);
      std::string name(reinterpret_cast<const char*>(h + 46), nlen);
      // ZIP64 extra field: the 64-bit values of the fields saturated above, in order.
      for (size_t x = 0; x + 4 <= xlen;) {
        const uint8_t* xf = h + 46 + nlen + x;
        const uint16_t id = rd16(xf), sz = rd16(xf + 2);
        if (x + 4 + sz > xlen) break;
        if (id == 1) {
          size_t q = 4;
          auto take64 = [&](uint64_t& v) {
            if (v == 0xffffffffu && q + 8 <= size_t(4 + sz)) {
              v = rd64(xf + q);
              q += 8;
            }
          };
          take64(usize);
          take64(csize);
          take64(loff);
        }
        x += 4 + size_t(sz);
      }
      p += 46 + size_t(nlen) + xlen + clen;
      LOOM_CHECK(method == 0 && csize == usize,
                 "'{}': zip entry '{}' is compressed (method {}); torch.save stores entries "
                 "uncompressed and loom reads only those. Re-save the file with torch.save "
                 "instead of re-zipping it", path, name, method);
      LOOM_CHECK(loff <= file_size_ && file_size_ - loff >= 30, "'{}': zip entry '{}' starts "
                 "beyond the end of the file (truncated?)", path, name);
      uint8_t lh[30];
      pread_all(fd_, lh, 30, loff, path);
      LOOM_CHECK(rd32(lh) == 0x04034b50u, "'{}': zip entry '{}' has a corrupt local header",
                 path, name);
      const uint64_t data = loff + 30 + rd16(lh + 26) + rd16(lh + 28);
      LOOM_CHECK(data <= file_size_ && usize <= file_size_ - data,
                 "'{}': zip entry '{}' ({} bytes at {}) extends past the end of the file ({} "
                 "bytes): the file is truncated", path, name, usize, data, file_size_);
      if (top_.empty()) top_ = name.substr(0, name.find('/') + 1);
      entries_[name] = Entry{data, usize};
    }
    LOOM_CHECK(!top_.empty() && entries_.count(top_ + "data.pkl"),
               "'{}': zip has no data.pkl record: not a torch.save file", path);
    if (entries_.count(top_ + "byteorder")) {
      const Entry& b = entries_.at(top_ + "byteorder");
      std::string order(size_t(std::min<uint64_t>(b.size, 16)), '\0');
      pread_all(fd_, order.data(), order.size(), b.data_offset, path);
      LOOM_CHECK(order.rfind("little", 0) == 0, "'{}': storages are '{}'-endian; loom reads "
                 "little-endian files only", path, order);
    }
    const Entry& pk = entries_.at(top_ + "data.pkl");
    LOOM_CHECK(pk.size < (uint64_t(1) << 31), "'{}': data.pkl of {} bytes is too large", path,
               pk.size);
    std::string pkl(size_t(pk.size), '\0');
    pread_all(fd_, pkl.data(), pk.size, pk.data_offset, path);
    root_ = unpickle_restricted(pkl, path);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

TorchFile::~TorchFile() {
  if (fd_ >= 0) ::close(fd_);
}

const TorchFile::Entry& TorchFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  LOOM_CHECK(it != entries_.end(), "'{}': storage record '{}' is missing from the zip", path_,
             name);
  return it->second;
}

void TorchFile::read_f32(const TorchTensorRef& t, float* dst) const {
  const bool floating = t.dtype == TorchDType::f32 || t.dtype == TorchDType::f16 ||
                        t.dtype == TorchDType::bf16 || t.dtype == TorchDType::f64;
  LOOM_CHECK(floating, "'{}': tensor of storage '{}' has dtype {}; only floating-point tensors "
             "(float64/32/16, bfloat16) are model weights", path_, t.storage_key,
             torch_dtype_name(t.dtype));
  const size_t es = torch_dtype_size(t.dtype);
  const Entry& e = entry(top_ + "data/" + t.storage_key);
  LOOM_CHECK(uint64_t(t.storage_numel) * es <= e.size,
             "'{}': storage '{}' claims {} elements of {} bytes but its record has {} bytes",
             path_, t.storage_key, t.storage_numel, es, e.size);
  const int64_t n = t.numel();
  if (n == 0) return;
  // Highest element index touched, checked against the storage before any read.
  int64_t last = t.storage_offset;
  bool contiguous = true;
  int64_t expect = 1;
  for (size_t d = t.shape.size(); d-- > 0;) {
    int64_t reach = 0;
    LOOM_CHECK(!__builtin_mul_overflow(t.shape[d] - 1, t.stride[d], &reach) &&
                   !__builtin_add_overflow(last, reach, &last),
               "'{}': tensor of storage '{}' has impossible strides", path_, t.storage_key);
    if (t.shape[d] != 1 && t.stride[d] != expect) contiguous = false;
    expect *= t.shape[d];
  }
  LOOM_CHECK(last < t.storage_numel, "'{}': tensor reaches element {} of storage '{}' which has "
             "{}", path_, last, t.storage_key, t.storage_numel);
  auto convert = [&](const uint8_t* src, float* out, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* s = src + size_t(i) * es;
      switch (t.dtype) {
        case TorchDType::f32: std::memcpy(&out[i], s, 4); break;
        case TorchDType::f64: { double v; std::memcpy(&v, s, 8); out[i] = float(v); break; }
        case TorchDType::f16: out[i] = f16_to_f32(rd16(s)); break;
        default: { uint32_t u = uint32_t(rd16(s)) << 16; std::memcpy(&out[i], &u, 4); }
      }
    }
  };
  const uint64_t base = e.data_offset;
  if (contiguous) {
    // Chunked: memory beyond dst stays bounded (4M elements).
    std::vector<uint8_t> buf;
    for (int64_t i = 0; i < n;) {
      const int64_t c = std::min<int64_t>(n - i, int64_t(1) << 22);
      buf.resize(size_t(c) * es);
      pread_all(fd_, buf.data(), buf.size(), base + uint64_t(t.storage_offset + i) * es, path_);
      convert(buf.data(), dst + i, c);
      i += c;
    }
    return;
  }
  // Strided view: read the storage span it covers, then gather.
  const int64_t span = last - t.storage_offset + 1;
  std::vector<uint8_t> buf(size_t(span) * es);
  pread_all(fd_, buf.data(), buf.size(), base + uint64_t(t.storage_offset) * es, path_);
  std::vector<int64_t> idx(t.shape.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (size_t d = 0; d < idx.size(); ++d) off += idx[d] * t.stride[d];
    convert(buf.data() + size_t(off) * es, dst + i, 1);
    for (size_t d = idx.size(); d-- > 0;) {
      if (++idx[d] < t.shape[d]) break;
      idx[d] = 0;
    }
  }
}

void flatten_state_dict(const PyRef& dict, const std::string& prefix,
                        std::map<std::string, TorchTensorRef>& tensors,
                        std::vector<std::string>& skipped) {
  struct Walk {
    std::map<std::string, TorchTensorRef>& tensors;
    std::vector<std::string>& skipped;
    void operator()(const PyRef& d, const std::string& pre, int depth) {
      LOOM_CHECK(depth < kMaxDepth, "state dict nested deeper than {} levels at '{}'", kMaxDepth,
                 pre);
      for (const auto& [k, v] : d->entries) {
        std::string key = k->kind == PyValue::Kind::string  ? k->s
                          : k->kind == PyValue::Kind::integer ? std::to_string(k->i)
                                                              : std::string("<") +
                                                                    py_kind_name(k->kind) + ">";
        const std::string name = pre.empty() ? key : pre + "." + key;
        if (v->kind == PyValue::Kind::dict) (*this)(v, name, depth + 1);
        else if (v->kind == PyValue::Kind::tensor) tensors[name] = v->tensor;
        else if (v->kind == PyValue::Kind::object) skipped.push_back(name + " (" + v->s + " object)");
        else skipped.push_back(name + " (" + py_kind_name(v->kind) + ")");
      }
    }
  };
  LOOM_CHECK(dict->kind == PyValue::Kind::dict, "the checkpoint holds a {}, not a state dict",
             py_kind_name(dict->kind));
  Walk{tensors, skipped}(dict, prefix, 0);
}

}  // namespace loom::checkpoint

// The expert loader's copy thread (see expert_loader.h): a priority queue of slot fills, each a
// pread of gate/up/down into staging and a single-threaded repack into the slot's weights.
#include "expertd/expert_loader.h"

#include <fcntl.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "expertd/errors.h"

namespace expertd {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void pread_all(int fd, const std::string& path, uint64_t offset, uint8_t* dst, size_t length) {
  size_t done = 0;
  while (done < length) {
    ssize_t r = ::pread(fd, dst + done, length - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      fail(ErrorCode::Io, "short read of " + path + " at " + std::to_string(offset + done) +
                              (r < 0 ? std::string(": ") + std::strerror(errno) : ": end of file"));
    done += static_cast<size_t>(r);
  }
}

}  // namespace

ExpertLoader::ExpertLoader() {
  thread_ = std::thread([this] { run(); });
}

ExpertLoader::~ExpertLoader() {
  shutdown();
  for (auto& kv : fds_) ::close(kv.second);
}

void ExpertLoader::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (quit_ && !thread_.joinable()) return;
    quit_ = true;
    for (int64_t t : queue_) {
      auto it = entries_.find(t);
      if (it == entries_.end()) continue;
      it->second.state = LoadState::Cancelled;
      it->second.error = "the expert loader was disposed before this load started";
      it->second.job.gate_up_w.reset();
      it->second.job.down_w.reset();
    }
    queue_.clear();
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t ExpertLoader::submit(ExpertLoadJob job) {
  std::lock_guard<std::mutex> lk(mu_);
  if (quit_) fail(ErrorCode::Disposed, "ExpertLoader has been disposed");
  int64_t t = next_ticket_++;
  Entry e;
  e.job = std::move(job);
  e.seq = next_seq_++;
  entries_.emplace(t, std::move(e));
  queue_.push_back(t);
  work_cv_.notify_one();
  return t;
}

bool ExpertLoader::known(int64_t ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  return entries_.count(ticket) != 0;
}

bool ExpertLoader::poll(int64_t ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(ticket);
  EXPERTD_CHECK(it != entries_.end(), ErrorCode::Range, "unknown ticket " + std::to_string(ticket));
  return it->second.state == LoadState::Done || it->second.state == LoadState::Cancelled;
}

std::string ExpertLoader::wait(int64_t ticket) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = entries_.find(ticket);
  EXPERTD_CHECK(it != entries_.end(), ErrorCode::Range,
                "ticket " + std::to_string(ticket) + " is not pending (already waited for or cancelled)");
  if (it->second.state == LoadState::Queued) {
    it->second.job.priority = std::numeric_limits<double>::infinity();
    work_cv_.notify_one();
  }
  done_cv_.wait(lk, [&] {
    auto s = entries_.at(ticket).state;
    return s == LoadState::Done || s == LoadState::Cancelled;
  });
  it = entries_.find(ticket);
  std::string err = std::move(it->second.error);
  entries_.erase(it);
  return err;
}

bool ExpertLoader::cancel(int64_t ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(ticket);
  EXPERTD_CHECK(it != entries_.end(), ErrorCode::Range,
                "ticket " + std::to_string(ticket) + " is not pending (already waited for or cancelled)");
  if (it->second.state != LoadState::Queued) return false;
  for (size_t i = 0; i < queue_.size(); ++i)
    if (queue_[i] == ticket) {
      queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  entries_.erase(it);
  return true;
}

size_t ExpertLoader::in_flight() {
  std::lock_guard<std::mutex> lk(mu_);
  return queue_.size() + running_;
}

ExpertLoader::Stats ExpertLoader::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

int ExpertLoader::fd_for(const std::string& path) {
  auto it = fds_.find(path);
  if (it != fds_.end()) return it->second;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorCode::Io, "cannot open " + path + ": " + std::strerror(errno));
  fds_.emplace(path, fd);
  return fd;
}

// gpt-oss: gate_up [H, 2I] (gate = even columns, up = odd) -> gate [I, H], up [I, H]; down [I, H]
// -> [H, I]. Elements are moved, never converted (T: the element's bytes as an integer).
template <typename T>
void gpt_oss_to_rows(const uint8_t* gu_raw, const uint8_t* down_raw, size_t h, size_t inter,
                     uint8_t* gate_out, uint8_t* up_out, uint8_t* down_out) {
  const T* w = reinterpret_cast<const T*>(gu_raw);
  const T* d = reinterpret_cast<const T*>(down_raw);
  T* gate = reinterpret_cast<T*>(gate_out);
  T* up = reinterpret_cast<T*>(up_out);
  T* down = reinterpret_cast<T*>(down_out);
  for (size_t r = 0; r < h; ++r)
    for (size_t i = 0; i < inter; ++i) {
      gate[i * h + r] = w[r * 2 * inter + 2 * i];
      up[i * h + r] = w[r * 2 * inter + 2 * i + 1];
    }
  for (size_t i = 0; i < inter; ++i)
    for (size_t r = 0; r < h; ++r) down[r * inter + i] = d[i * h + r];
}

namespace {
// One matrix's FP8 scales as read (raw: dtype, form) -> the f32 grid [ceil(rows / br), ceil(cols / bc)]
// pack_fp8_weight reads.
void spread_fp8_scales(const std::vector<uint8_t>& raw, DType dtype, Fp8ScaleForm form, int rows, int cols,
                       int br, int bc, std::vector<float>& grid) {
  const size_t nbr = static_cast<size_t>((rows + br - 1) / br), nbc = static_cast<size_t>((cols + bc - 1) / bc);
  auto at = [&](size_t i) {
    if (dtype == DType::F32) {
      float v;
      std::memcpy(&v, raw.data() + 4 * i, 4);
      return v;
    }
    uint16_t h;
    std::memcpy(&h, raw.data() + 2 * i, 2);
    return dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
  };
  grid.resize(nbr * nbc);
  for (size_t r = 0; r < nbr; ++r)
    for (size_t c = 0; c < nbc; ++c)
      grid[r * nbc + c] = form == Fp8ScaleForm::Grid ? at(r * nbc + c) : form == Fp8ScaleForm::Row ? at(r) : at(0);
}
}  // namespace

void ExpertLoader::execute(ExpertLoadJob& job, Stats& local) {
  auto t0 = Clock::now();
  auto read = [&](const FileRange& r, std::vector<uint8_t>& stage) {
    if (stage.size() < r.size_bytes) stage.resize(r.size_bytes);
    pread_all(fd_for(r.path), r.path, r.offset, stage.data(), r.size_bytes);
  };
  // An FP8 matrix's scales [rows, cols] onto the block grid (as stored when they are f32 on it).
  auto read_scales = [&](const FileRange& r, int rows, int cols, std::vector<float>& stage) {
    if (job.fp8_scale_dtype == DType::F32 && job.fp8_scale_form == Fp8ScaleForm::Grid) {
      stage.resize((r.size_bytes + 3) / 4);
      pread_all(fd_for(r.path), r.path, r.offset, reinterpret_cast<uint8_t*>(stage.data()), r.size_bytes);
      return;
    }
    read(r, stage_scale_raw_);
    spread_fp8_scales(stage_scale_raw_, job.fp8_scale_dtype, job.fp8_scale_form, rows, cols, job.fp8_br,
                      job.fp8_bc, stage);
  };
  if (job.gpt_oss) {
    read(job.gate, stage_raw_gu_);
    read(job.down, stage_raw_down_);
  } else {
    read(job.gate, stage_gate_);
    read(job.up, stage_up_);
    read(job.down, stage_down_);
  }
  const bool fp8 = job.fp8_br > 0;
  if (fp8) {
    const int inter = job.gate_up_w->n / 2, h = job.gate_up_w->k;
    read_scales(job.gate_scale, inter, h, stage_gate_scale_);
    read_scales(job.up_scale, inter, h, stage_up_scale_);
    read_scales(job.down_scale, h, inter, stage_down_scale_);
  }
  local.read_seconds = seconds_since(t0);
  local.bytes_read = job.gate.size_bytes + job.up.size_bytes + job.down.size_bytes +
                     (fp8 ? job.gate_scale.size_bytes + job.up_scale.size_bytes + job.down_scale.size_bytes : 0);
  if (job.gpt_oss) {
    const size_t h = static_cast<size_t>(job.gate_up_w->k), inter = static_cast<size_t>(job.gate_up_w->n / 2);
    const size_t bytes = h * inter * dtype_size(job.dtype);
    for (auto* v : {&stage_gate_, &stage_up_, &stage_down_})
      if (v->size() < bytes) v->resize(bytes);
    if (dtype_size(job.dtype) == 4)
      gpt_oss_to_rows<uint32_t>(stage_raw_gu_.data(), stage_raw_down_.data(), h, inter, stage_gate_.data(),
                                stage_up_.data(), stage_down_.data());
    else
      gpt_oss_to_rows<uint16_t>(stage_raw_gu_.data(), stage_raw_down_.data(), h, inter, stage_gate_.data(),
                                stage_up_.data(), stage_down_.data());
  }
  // NOTE: single-threaded packing: entering the compute pool from this thread would serialise
  // the loader behind the engine's kernels (and them behind it).
  if (fp8) {
    pack_fp8_weight(*job.gate_up_w, stage_gate_.data(), stage_gate_scale_.data(), stage_up_.data(),
                    stage_up_scale_.data(), job.fp8_br, job.fp8_bc, false);
    pack_fp8_weight(*job.down_w, stage_down_.data(), stage_down_scale_.data(), nullptr, nullptr,
                    job.fp8_br, job.fp8_bc, false);
  } else {
    pack_gate_up(*job.gate_up_w, stage_gate_.data(), stage_up_.data(), job.dtype, false);
    pack_weight(*job.down_w, stage_down_.data(), job.dtype, false);
  }
  if (job.delay_us > 0) {
    // SIMULATION: the link's time follows the host-side work; a DMA copy costs time but no CPU,
    // so sleep (the thread's timer slack is set fine in run()).
    auto s0 = Clock::now();
    std::this_thread::sleep_until(s0 + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double, std::micro>(job.delay_us)));
    local.simulated_seconds = seconds_since(s0);
  }
  local.busy_seconds = seconds_since(t0);
}

void ExpertLoader::run() {
#if defined(__linux__)
  // Sleeps of tens of microseconds (the simulated link) need a timer slack below the 50 us default.
  ::prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
#endif
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    work_cv_.wait(lk, [&] { return quit_ || !queue_.empty(); });
    if (quit_) return;
    // Highest priority, then oldest. The queue is short (a byte window of jobs), a scan is fine.
    size_t best = 0;
    for (size_t i = 1; i < queue_.size(); ++i) {
      const Entry& a = entries_.at(queue_[i]);
      const Entry& b = entries_.at(queue_[best]);
      if (a.job.priority > b.job.priority || (a.job.priority == b.job.priority && a.seq < b.seq))
        best = i;
    }
    int64_t ticket = queue_[best];
    queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(best));
    Entry& entry = entries_.at(ticket);
    entry.state = LoadState::Running;
    ExpertLoadJob job = std::move(entry.job);  // the thread owns the weights while it runs
    ++running_;
    lk.unlock();
    Stats local;
    std::string err;
    try {
      execute(job, local);
    } catch (const std::exception& ex) {
      err = ex.what();
      if (err.empty()) err = "expert load failed";
    } catch (...) {
      err = "expert load failed (unknown exception)";
    }
    job.gate_up_w.reset();
    job.down_w.reset();
    lk.lock();
    --running_;
    Entry& done = entries_.at(ticket);  // NOTE: running entries are never erased by cancel()
    done.state = LoadState::Done;
    done.error = std::move(err);
    stats_.busy_seconds += local.busy_seconds;
    stats_.read_seconds += local.read_seconds;
    stats_.simulated_seconds += local.simulated_seconds;
    stats_.bytes_read += local.bytes_read;
    stats_.jobs_done++;
    done_cv_.notify_all();
  }
}

}  // namespace expertd

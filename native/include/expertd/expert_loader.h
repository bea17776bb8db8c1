// The expert loader: one copy thread of its own (not the compute pool) that fills expert cache
// slots from the checkpoint files (pread into staging, then repack into the slot's packed
// weights), in priority order, while the engine thread computes. The offloader's slow tier on CPU.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "expertd/dtype.h"
#include "expertd/ops.h"

namespace expertd {

struct FileRange {
  std::string path;
  uint64_t offset = 0;
  size_t size_bytes = 0;
};

// How an FP8 job's scale ranges hold each matrix's scales: the block grid [ceil(rows / br),
// ceil(cols / bc)], one per output row ([rows, 1]; br is 1), or one for the whole matrix.
enum class Fp8ScaleForm { Grid, Row, Tensor };

// One slot fill. gate [I, H], up [I, H], down [H, I] row-major in `dtype` at the given ranges;
// gate_up ([2I, H] GateUp) and down ([H, I] Plain) are the slot's weights, repacked in place.
// NOTE: the job holds the slot's weights (shared_ptr) so they outlive a dispose() on the JS side;
// compute must not read them until the job is waited for.
struct ExpertLoadJob {
  FileRange gate, up, down;
  // gpt-oss's layout: `gate` is the expert's gate_up_proj [H, 2I] (x @ W; gate = even columns, up =
  // odd), `up` is unused, `down` is down_proj [I, H]; transposed and de-interleaved on the copy thread.
  bool gpt_oss = false;
  DType dtype = DType::BF16;
  // An FP8 checkpoint's expert kept in FP8 (fp8_br > 0): gate, up and down are e4m3 codes and
  // these their scales (weight_scale_inv / weight_scale) in fp8_scale_dtype (F32, BF16 or F16) and
  // fp8_scale_form, spread onto the [ceil(rows / br), ceil(cols / bc)] grid as they load; the slot
  // is an fp8 weight of group bc.
  FileRange gate_scale, up_scale, down_scale;
  int fp8_br = 0, fp8_bc = 0;
  DType fp8_scale_dtype = DType::F32;
  Fp8ScaleForm fp8_scale_form = Fp8ScaleForm::Grid;
  std::shared_ptr<PackedWeight> gate_up_w;
  std::shared_ptr<PackedWeight> down_w;
  double priority = 0;       // higher first; FIFO among equals
  double delay_us = 0;       // SIMULATION: extra sleep on the copy thread (a host-to-device link)
};

enum class LoadState { Queued, Running, Done, Cancelled };

class ExpertLoader {
 public:
  ExpertLoader();
  ~ExpertLoader();  // cancels queued jobs, finishes the running one, joins the thread
  ExpertLoader(const ExpertLoader&) = delete;
  ExpertLoader& operator=(const ExpertLoader&) = delete;

  // Queues a job; returns its ticket (> 0).
  int64_t submit(ExpertLoadJob job);
  // True when the job finished (or failed); false while queued or running.
  bool poll(int64_t ticket);
  // Blocks until the job is done and forgets the ticket; returns the error text ("" on success).
  // A job still queued is first raised to the top priority: whoever waits needs it now.
  std::string wait(int64_t ticket);
  // Drops a job that has not started (true) and forgets the ticket; false when it is running or
  // done (the ticket stays valid: wait() for it).
  bool cancel(int64_t ticket);
  // Jobs queued or running.
  size_t in_flight();
  // Stops the thread after the running job; queued jobs are dropped. Idempotent.
  void shutdown();
  bool known(int64_t ticket);

  // Totals since creation (read under the lock).
  struct Stats {
    double busy_seconds = 0;       // copy thread working (reads + repack + simulated sleep)
    double read_seconds = 0;       // preads
    double simulated_seconds = 0;  // SIMULATION sleeps
    uint64_t jobs_done = 0;
    uint64_t bytes_read = 0;
  };
  Stats stats();

 private:
  struct Entry {
    ExpertLoadJob job;
    uint64_t seq = 0;
    LoadState state = LoadState::Queued;
    std::string error;
  };
  void run();
  void execute(ExpertLoadJob& job, Stats& local);
  int fd_for(const std::string& path);

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::unordered_map<int64_t, Entry> entries_;  // tickets not yet waited for / cancelled
  std::vector<int64_t> queue_;                  // queued tickets (picked by priority, then seq)
  int64_t next_ticket_ = 1;
  uint64_t next_seq_ = 0;
  size_t running_ = 0;
  bool quit_ = false;
  Stats stats_;
  // Copy-thread only: open checkpoint files and the staging buffers (grow-only).
  std::unordered_map<std::string, int> fds_;
  std::vector<uint8_t> stage_gate_, stage_up_, stage_down_;
  std::vector<float> stage_gate_scale_, stage_up_scale_, stage_down_scale_;  // FP8 jobs: the grids
  std::vector<uint8_t> stage_scale_raw_;  // FP8 jobs: one matrix's scales as read
  std::vector<uint8_t> stage_raw_gu_, stage_raw_down_;  // gpt-oss: the checkpoint's layout
  std::thread thread_;
};

}  // namespace expertd

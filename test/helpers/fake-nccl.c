/* A stand-in for libnccl.so.2 (tests of the full build's NCCL join on machines without a GPU or
 * without peers): the NCCL 2.14+ entry points native/comm/nccl.cc binds, with the behaviour of a
 * group whose other ranks never come. FAKE_NCCL_MODE:
 *   hang   ncclCommInitRankConfig returns ncclInProgress and the communicator stays in progress
 *          (ncclCommGetAsyncError) until ncclCommAbort
 *   error  the join fails asynchronously with ncclSystemError (2)
 * Every call is written to stderr as "fake-nccl: NAME", so a test can see the abort. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int ncclResult_t;
typedef struct { char internal[128]; } ncclUniqueId;
typedef void* ncclComm_t;

static int comm_token;
static int aborted;

static void say(const char* name) { fprintf(stderr, "fake-nccl: %s\n", name); fflush(stderr); }
static int mode_error(void) { const char* m = getenv("FAKE_NCCL_MODE"); return m && strcmp(m, "error") == 0; }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) { say("ncclGetUniqueId"); memset(id, 7, sizeof *id); return 0; }
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int n, ncclUniqueId id, int rank, void* config) {
  (void)n; (void)id; (void)rank;
  /* The config a caller passes must be a nonblocking one (blocking = 0 after size, magic, version). */
  const int blocking = *(const int*)((const char*)config + sizeof(size_t) + 2 * sizeof(unsigned));
  say(blocking == 0 ? "ncclCommInitRankConfig nonblocking" : "ncclCommInitRankConfig blocking");
  *comm = &comm_token;
  return 7; /* ncclInProgress */
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  (void)comm;
  *state = aborted ? 0 : mode_error() ? 2 : 7;
  return 0;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { (void)comm; aborted = 1; say("ncclCommAbort"); return 0; }
ncclResult_t ncclSend(const void* b, size_t n, int t, int peer, ncclComm_t c, void* s) { (void)b; (void)n; (void)t; (void)peer; (void)c; (void)s; return 0; }
ncclResult_t ncclRecv(void* b, size_t n, int t, int peer, ncclComm_t c, void* s) { (void)b; (void)n; (void)t; (void)peer; (void)c; (void)s; return 0; }
ncclResult_t ncclGroupStart(void) { return 0; }
ncclResult_t ncclGroupEnd(void) { return 0; }
const char* ncclGetErrorString(ncclResult_t r) { return r == 2 ? "unhandled system error" : "fake error"; }

// A rank of the GroupExpertComm test (ep.test.ts): every rank routes rows of its own to every
// expert (identity experts included), the owners "compute" y = x * (expert + 1), and each rank
// checks that its rows came back, in place, as exactly that. `owner` (optional): the expert
// placement as the owner rank of each expert (default: contiguous slices).
import { isMainThread, parentPort, workerData } from 'node:worker_threads';

import { loadNative } from '../../src/native/index.js';
import { GroupExpertComm, placementFromOwners } from '../../src/moe/ep-comm.js';
import { DeviceExpertComm } from '../../src/moe/device-ep.js';
import type { CudaBuffer } from '../../src/native/index.js';
import { createCudaEmulator } from './cuda-emu.js';
import { mulberry32 } from '../../src/engine/rng.js';

const { group, world, rank, E, Z, H, steps, seed, ncclId, owner } = (workerData ?? {}) as { group: string; world: number; rank: number; E: number; Z: number; H: number; steps: number; seed: number; ncclId?: Uint8Array; owner?: number[] };
const experts = () => (owner ? placementFromOwners(owner, world) : E);

/** This rank's routing of one step: rank-dependent loads, some experts empty, sometimes no rows at all. */
function stepOffsets(rand: () => number, step: number): Int32Array {
  const counts = Array.from({ length: E + Z }, () => (rand() < 0.3 ? 0 : Math.floor(rand() * 4)));
  if ((step + rank) % 3 === 2) counts.fill(0);
  const offsets = new Int32Array(E + Z + 1);
  counts.forEach((c, e) => { offsets[e + 1] = offsets[e]! + c; });
  return offsets;
}

// `node --test dist/test/` also loads this file in the main thread: there it does nothing.
if (!isMainThread) {
  if (ncclId) runDevice();
  else run();
}

/** The same over device buffers (an emulator per rank, NCCL as the loopback group): bf16 rows out, f32 back. */
function runDevice(): void {
  const cu = createCudaEmulator();
  const comm = new DeviceExpertComm(cu, cu.cudaNcclJoin(ncclId!, world, rank), experts());
  const bufs = new Map<string, CudaBuffer>();
  const scratch = (name: string, bytes: number) => {
    let b = bufs.get(name);
    if (!b || b.sizeBytes < Math.max(16, bytes)) { b = cu.cudaBuffer(Math.max(16, bytes)); bufs.set(name, b); }
    return b;
  };
  const rand = mulberry32(seed + 2000 + rank);
  let checked = 0;
  try {
    for (let step = 0; step < steps; step++) {
      const offsets = stepOffsets(rand, step);
      const rows = offsets[E + Z]!;
      const xf = Float32Array.from({ length: rows * H }, (_, i) => rank * 64 + step * 8 + (i % 13) * 0.25);
      const xb = new Uint16Array(xf.length);
      loadNative().convert(xf, 'f32', xb, 'bf16');
      const xPerm = scratch('x', xb.byteLength);
      cu.cudaCopyToDevice(xPerm, 0, xb);
      const local = comm.dispatch(xPerm, offsets, H, null, scratch);
      for (let e = 0; e < E; e++) if (!comm.ownsExpert(e) && local.offsets[e + 1] !== local.offsets[e]) throw new Error(`device: rows for expert ${e} not owned`);
      const lx = new Uint16Array(local.rows * H);
      if (lx.length) cu.cudaCopyToHost(lx, local.x, 0);
      const lf = new Float32Array(lx.length);
      loadNative().convert(lx, 'bf16', lf, 'f32');
      for (let e = 0; e < E; e++)
        for (let r = local.offsets[e]!; r < local.offsets[e + 1]!; r++)
          for (let j = 0; j < H; j++) lf[r * H + j] = lf[r * H + j]! * (e + 1);
      const yLocal = scratch('ylocal', lf.byteLength);
      if (lf.length) cu.cudaCopyToDevice(yLocal, 0, lf);
      const yPerm = scratch('yperm', rows * H * 4);
      comm.combine(yLocal, yPerm, H, null, scratch);
      const got = new Float32Array(offsets[E]! * H);
      if (got.length) cu.cudaCopyToHost(got, yPerm, 0);
      const xr = new Float32Array(xb.length);
      loadNative().convert(xb, 'bf16', xr, 'f32');
      for (let e = 0; e < E; e++)
        for (let r = offsets[e]!; r < offsets[e + 1]!; r++)
          for (let j = 0; j < H; j++) {
            const want = xr[r * H + j]! * (e + 1);
            if (got[r * H + j] !== want) throw new Error(`device step ${step} row ${r} (expert ${e}): ${got[r * H + j]} != ${want}`);
            checked++;
          }
    }
    parentPort!.postMessage({ ok: true, checked });
  } catch (e) {
    parentPort!.postMessage({ ok: false, error: (e as Error).message });
  } finally {
    comm.dispose();
  }
}

function run(): void {
  const comm = new GroupExpertComm(loadNative().loopbackJoin(group, world, rank, 20_000), experts());
  const rand = mulberry32(seed + 1000 + rank);
  let checked = 0;
  try {
    for (let step = 0; step < steps; step++) {
        const offsets = stepOffsets(rand, step);
      const rows = offsets[E + Z]!;
      const xPerm = Float32Array.from({ length: rows * H }, (_, i) => rank * 1000 + step * 100 + i % 97 + 0.5);
      const local = comm.dispatch(xPerm, offsets, H);
      for (let e = 0; e < E; e++) if (!comm.ownsExpert(e) && local.offsets[e + 1] !== local.offsets[e]) throw new Error(`rows for expert ${e} not owned`);
      const yLocal = new Float32Array(local.x.length);
      for (let e = 0; e < E + Z; e++)
        for (let r = local.offsets[e]!; r < local.offsets[e + 1]!; r++)
          for (let j = 0; j < H; j++) yLocal[r * H + j] = local.x[r * H + j]! * (e < E ? e + 1 : 1);
      const yPerm = new Float32Array(rows * H).fill(NaN);
      comm.combine(yLocal, yPerm, H);
      for (let e = 0; e < E + Z; e++)
        for (let r = offsets[e]!; r < offsets[e + 1]!; r++)
          for (let j = 0; j < H; j++) {
            const want = xPerm[r * H + j]! * (e < E ? e + 1 : 1);
            if (yPerm[r * H + j] !== want) throw new Error(`step ${step} row ${r} (expert ${e}) col ${j}: ${yPerm[r * H + j]} != ${want}`);
            checked++;
          }
    }
    parentPort!.postMessage({ ok: true, checked });
  } catch (e) {
    parentPort!.postMessage({ ok: false, error: (e as Error).message });
  } finally {
    comm.dispose();
  }
}

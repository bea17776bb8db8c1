// Why a CUDA test cannot run here (node:test `skip` values): the portable build has no CUDA; the full
// build may see no device. false = it runs.
import { loadNative } from '../../src/native/index.js';

const caps = loadNative().capabilities();

/** Needs the full build (argument checks that never touch a device). */
export const needsCudaBuild: string | false = caps.cudaCompiled ? false : 'CUDA not compiled in (portable build)';

/** Needs a CUDA device. */
export const needsCudaDevice: string | false = needsCudaBuild
  || (caps.cudaDevices === 0 ? `no CUDA device (cudaDevices = ${caps.cudaDevices})` : false);

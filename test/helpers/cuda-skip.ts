// Why a CUDA test cannot run here (node:test `skip` values): the portable build has no CUDA; the full
// build may see no device. false = it runs.
import { loadNative, noCudaDeviceReason } from '../../src/native/index.js';

const caps = loadNative().capabilities();

/** Needs the full build (argument checks that never touch a device). */
export const needsCudaBuild: string | false = caps.cudaCompiled ? false : 'CUDA not compiled in (portable build)';

/**
 * Emulator-only tests (the TypeScript stand-in for the cuda* ops): skipped where
 * EXPERTD_SKIP_EMULATOR=1, as bench/gpu-run.sh sets on a lent GPU, whose minutes go to the device.
 */
export const emulatorSkip: string | false = process.env.EXPERTD_SKIP_EMULATOR === '1'
  ? 'EXPERTD_SKIP_EMULATOR=1 (emulator-only tests are skipped on the GPU run)' : false;

/** Needs a CUDA device. The skip names the runtime's error (insufficient driver, no device, ...). */
export const needsCudaDevice: string | false = needsCudaBuild || (noCudaDeviceReason(caps) ?? false);

/**
 * Rank processes with --dist-moe expert (the CPU group, and the stand-in device group between processes)
 * need the addon built with Gloo (libgloo-dev at build time; .ci/run installs it).
 */
export const needsGloo: string | false = caps.gloo ? false
  : 'this addon was built without Gloo (install libgloo-dev and rebuild): --dist-moe expert rank processes cannot join';

// Writes a variant of a fixture checkpoint for tests: new tensors beside the fixture's config (with or
// without its quantization_config), tokenizer and goldens.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

import { readSafetensorsHeader, writeSafetensors, type TensorToWrite } from '../../src/model/safetensors.js';

/** A fixture checkpoint's tensors as stored (its one model.safetensors). */
export function storedTensors(dir: string): TensorToWrite[] {
  const file = path.join(dir, 'model.safetensors');
  const header = readSafetensorsHeader(file);
  const bytes = readFileSync(file);
  return header.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape,
    data: Uint8Array.from(bytes.subarray(header.dataStart + t.begin, header.dataStart + t.end)) }));
}

/** A stored I32 tensor's values. */
export const i32 = (t: TensorToWrite) => new Int32Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 4);

/**
 * `out` = `tensors` + `src`'s config.json (its quantization_config kept when `quant` is true, dropped when
 * false, replaced when an object) and other files.
 */
export function writeCheckpointCopy(src: string, out: string, tensors: TensorToWrite[], quant: boolean | Record<string, unknown>): void {
  mkdirSync(out, { recursive: true });
  writeSafetensors(path.join(out, 'model.safetensors'), tensors);
  const config = JSON.parse(readFileSync(path.join(src, 'config.json'), 'utf8')) as Record<string, unknown>;
  if (quant === false) delete config.quantization_config;
  else if (quant !== true) config.quantization_config = quant;
  writeFileSync(path.join(out, 'config.json'), JSON.stringify(config));
  for (const f of ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'golden.json'])
    copyFileSync(path.join(src, f), path.join(out, f));
}

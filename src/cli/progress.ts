// Load progress on a terminal (tensors and bytes), nothing when stderr is not a TTY (logs get the
// one-line summary instead).
import type { EventEmitter } from 'node:events';

import type { ModelInfo } from '../engine/types.js';

export function showLoadProgress(engine: Pick<EventEmitter, 'on' | 'off'> & { ready: Promise<ModelInfo> }, stream: NodeJS.WriteStream = process.stderr): void {
  if (!stream.isTTY) return;
  const mib = (b: number) => (b / 2 ** 20).toFixed(0);
  const onProgress = (p: { tensorsDone: number; tensorsTotal: number; bytesDone: number; bytesTotal: number }) => {
    const pct = p.bytesTotal ? Math.min(100, (100 * p.bytesDone) / p.bytesTotal) : 100;
    stream.write(`\rloading ${pct.toFixed(0).padStart(3)}%  ${p.tensorsDone}/${p.tensorsTotal} tensors  ` +
      `${mib(p.bytesDone)}/${mib(p.bytesTotal)} MiB`);
  };
  engine.on('progress', onProgress);
  void engine.ready.finally(() => {
    engine.off('progress', onProgress);
    stream.write('\r\x1b[K');
  }).catch(() => undefined);
}

// `expertd generate`: one prompt through the engine, text streamed to stdout as it is decoded.
import { EngineClient } from '../engine/engine-client.js';
import { ModelTokenizer } from '../model/tokenizer.js';
import { modelFlags } from './engine-flags.js';
import { showLoadProgress } from './progress.js';
import { formatHelp, parseFlags, UsageError, type FlagSpec } from './options.js';
import { resolveEngineOptions } from './resolve.js';
import { offloadFlags } from './trace.js';

export const generateFlags: FlagSpec[] = [
  ...modelFlags,
  ...offloadFlags,
  { name: 'prompt', type: 'string', arg: 'TEXT', help: 'Raw text prompt (the tokenizer adds BOS where the model expects it)', noEnv: true },
  { name: 'chat', type: 'string', arg: 'TEXT', help: "A user message, formatted with the model's chat template", noEnv: true },
  { name: 'max-tokens', type: 'int', min: 1, default: 64, help: 'Tokens to generate at most', noEnv: true },
  { name: 'temperature', type: 'number', min: 0, default: 0, help: '0 = greedy', noEnv: true },
  { name: 'top-p', type: 'number', min: 0, max: 1, default: 1, help: 'Nucleus sampling mass', noEnv: true },
  { name: 'top-k', type: 'int', min: -1, default: 0, help: 'Sample among the k most likely tokens (0 = off)', noEnv: true },
  { name: 'seed', type: 'int', help: 'Random seed (same seed, same output)', noEnv: true },
  { name: 'ignore-eos', type: 'boolean', help: 'Keep generating past the end-of-sequence token', noEnv: true },
];

export const generateHelp = formatHelp('expertd generate --model DIR (--prompt TEXT | --chat TEXT) [options]',
  'Generates text from one prompt and streams it to stdout (the load summary goes to stderr).', generateFlags);

export async function generateCommand(argv: string[]): Promise<number> {
  const { flags } = parseFlags(generateFlags, argv);
  const prompt = flags['prompt'] as string | undefined;
  const chat = flags['chat'] as string | undefined;
  if ((prompt === undefined) === (chat === undefined)) throw new UsageError('give exactly one of --prompt or --chat');
  const opts = resolveEngineOptions(flags);
  if (opts.isDemo) process.stderr.write('expertd: no --model given, using the built-in demo model (random weights: its text is gibberish)\n');
  const tok = ModelTokenizer.load(opts.modelDir);
  const ids = chat !== undefined
    ? tok.encode(tok.applyChatTemplate([{ role: 'user', content: chat }], { addGenerationPrompt: true }), false)
    : tok.encode(prompt!, true);
  const engine = new EngineClient({ ...opts, maxNumSeqs: 1 });
  showLoadProgress(engine);
  try {
    await engine.ready;
    process.stderr.write(`${engine.summary}\n`);
    const detok = tok.detokenizer(ids);
    const seed = flags['seed'] as number | undefined;
    await new Promise<void>((resolve, reject) => {
      engine.generate({
        id: 'generate-0', promptTokenIds: ids, maxTokens: Number(flags['max-tokens']),
        sampling: {
          temperature: Number(flags['temperature']), topP: Number(flags['top-p']), topK: Number(flags['top-k']),
          minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
          ...(seed !== undefined ? { seed } : {}),
        },
        stopTokenIds: [], ignoreEos: Boolean(flags['ignore-eos']), minTokens: 0, returnRoutedExperts: false,
      }, (ev) => {
        if (ev.type === 'tokens') {
          for (const id of ev.tokenIds) process.stdout.write(detok.push(id));
        } else {
          process.stdout.write(`${detok.flush()}\n`);
          if (ev.reason === 'error') reject(new Error(ev.error ?? 'generation failed'));
          else resolve();
        }
      });
    });
  } finally {
    await engine.close();
  }
  return 0;
}

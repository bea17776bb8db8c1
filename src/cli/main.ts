// expertd command line: serve | generate | trace, each with its own --help.
import { generateCommand, generateHelp } from './generate.js';
import { UsageError } from './options.js';
import { serveCommand, serveHelp } from './serve.js';
import { traceCommand, traceHelp } from './trace.js';

const usage = `Usage: expertd <command> [options]

Commands:
  serve       Serve a model over an OpenAI-compatible HTTP API (default: the built-in demo model)
  generate    Generate text from one prompt and stream it to stdout
  trace       Inspect expert-activation traces: summary, heatmap (PNG or SVG plot), replay against a cache

Run 'expertd <command> --help' for the options of a command.
Every option can also be set through an EXPERTD_* environment variable (e.g. EXPERTD_PORT=8080).`;

interface Command { run(argv: string[]): Promise<number>; help: () => string }

function commands(): Record<string, Command> {
  const list: Record<string, Command> = {
    serve: { run: serveCommand, help: () => serveHelp },
    generate: { run: generateCommand, help: () => generateHelp },
    trace: { run: traceCommand, help: () => traceHelp },
  };
  return list;
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage);
    return name ? 0 : 1;
  }
  if (name === '--version') {
    const { readFileSync } = await import('node:fs');
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
    console.log(pkg.version);
    return 0;
  }
  const cmds = commands();
  const cmd = cmds[name];
  if (!cmd) {
    console.error(`expertd: unknown command '${name}'\n\n${usage}`);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(cmd.help());
    return 0;
  }
  try {
    return await cmd.run(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`expertd ${name}: ${e.message}`);
      return 2;
    }
    console.error(`expertd ${name}: ${(e as Error).message}`);
    return 1;
  }
}

// Declarative command-line flags: one table per subcommand drives parsing, EXPERTD_* environment
// defaults, validation and the --help text, so the help can never drift from what is accepted.

export type FlagType = 'string' | 'int' | 'number' | 'boolean';

export interface FlagSpec {
  name: string;              // long name without dashes, kebab-case
  type: FlagType;
  help: string;
  default?: string | number | boolean;
  choices?: readonly string[];
  min?: number;
  max?: number;
  /** Value placeholder in help (e.g. DIR). */
  arg?: string;
  /** Not read from the environment. */
  noEnv?: boolean;
}

export class UsageError extends Error {
  override name = 'UsageError';
}

export type ParsedFlags = Record<string, string | number | boolean | undefined>;

export function envName(flag: string): string {
  return `EXPERTD_${flag.replace(/-/g, '_').toUpperCase()}`;
}

function convert(spec: FlagSpec, raw: string, from: string): string | number | boolean {
  switch (spec.type) {
    case 'boolean': {
      const v = raw.toLowerCase();
      if (['1', 'true', 'yes', 'on', ''].includes(v)) return true;
      if (['0', 'false', 'no', 'off'].includes(v)) return false;
      throw new UsageError(`${from}: expected true or false, got '${raw}'`);
    }
    case 'int':
    case 'number': {
      const n = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(n) || (spec.type === 'int' && !Number.isInteger(n)))
        throw new UsageError(`${from}: expected ${spec.type === 'int' ? 'an integer' : 'a number'}, got '${raw}'`);
      if (spec.min !== undefined && n < spec.min) throw new UsageError(`${from}: ${n} is below the minimum ${spec.min}`);
      if (spec.max !== undefined && n > spec.max) throw new UsageError(`${from}: ${n} is above the maximum ${spec.max}`);
      return n;
    }
    default:
      if (spec.choices && !spec.choices.includes(raw))
        throw new UsageError(`${from}: '${raw}' is not one of ${spec.choices.join(', ')}`);
      return raw;
  }
}

/** Parses argv against the table; flags not given fall back to EXPERTD_* then defaults. */
export function parseFlags(specs: readonly FlagSpec[], argv: string[], env = process.env):
    { flags: ParsedFlags; positionals: string[] } {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const flags: ParsedFlags = {};
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--') || a === '--') {
      if (a === '--') { positionals.push(...argv.slice(i + 1)); break; }
      positionals.push(a);
      continue;
    }
    let name = a.slice(2);
    let value: string | undefined;
    const eq = name.indexOf('=');
    if (eq >= 0) { value = name.slice(eq + 1); name = name.slice(0, eq); }
    let spec = byName.get(name);
    if (!spec && name.startsWith('no-') && byName.get(name.slice(3))?.type === 'boolean') {
      spec = byName.get(name.slice(3));
      flags[spec!.name] = false;
      continue;
    }
    if (!spec) throw new UsageError(`unknown option --${name} (see --help)`);
    if (spec.type === 'boolean') {
      flags[spec.name] = value === undefined ? true : convert(spec, value, `--${name}`);
      continue;
    }
    if (value === undefined) {
      value = argv[++i];
      if (value === undefined) throw new UsageError(`--${name} needs a value`);
    }
    flags[spec.name] = convert(spec, value, `--${name}`);
  }
  for (const s of specs) {
    if (flags[s.name] !== undefined) continue;
    const e = s.noEnv ? undefined : env[envName(s.name)];
    if (e !== undefined && e !== '') flags[s.name] = convert(s, e, envName(s.name));
    else if (s.default !== undefined) flags[s.name] = s.default;
  }
  return { flags, positionals };
}

export function formatHelp(usage: string, description: string, specs: readonly FlagSpec[]): string {
  const lines = [`Usage: ${usage}`, '', description, '', 'Options:'];
  const left = specs.map((s) => `  --${s.name}${s.type === 'boolean' ? '' : ` ${s.arg ?? s.type.toUpperCase()}`}`);
  const width = Math.min(34, Math.max(...left.map((l) => l.length)) + 2);
  specs.forEach((s, i) => {
    let help = s.help;
    if (s.choices) help += ` (${s.choices.join('|')})`;
    if (s.default !== undefined && s.default !== '') help += ` [default: ${String(s.default)}]`;
    if (!s.noEnv) help += ` [env: ${envName(s.name)}]`;
    const l = left[i]!;
    lines.push(l.length >= width ? `${l}\n${' '.repeat(width)}${help}` : `${l.padEnd(width)}${help}`);
  });
  lines.push(`  --help${' '.repeat(Math.max(1, width - 8))}Show this help`);
  return lines.join('\n');
}

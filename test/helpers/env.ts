// Runs f with one environment variable set (a string) or unset (undefined), then puts it back as it
// was. For switches the native code reads per call (EXPERTD_SM90, EXPERTD_QGEMV, EXPERTD_FP8_ACT).
export function withEnv<T>(name: string, value: string | undefined, f: () => T): T {
  const saved = process.env[name];
  if (value === undefined) delete process.env[name];
  else process.env[name] = value;
  try {
    return f();
  } finally {
    if (saved === undefined) delete process.env[name];
    else process.env[name] = saved;
  }
}

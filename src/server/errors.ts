// OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, and the mapping of every
// Fastify/ajv failure (schema, JSON, body size, content type) onto that shape.

import type { FastifyError } from 'fastify';

export type ErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'not_found_error'
  | 'rate_limit_error'
  | 'overloaded_error'
  | 'server_error';

export interface ErrorBody {
  error: { message: string; type: ErrorType; param: string | null; code: string | null };
}

export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly type: ErrorType,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }

  body(): ErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export const invalidRequest = (message: string, param: string | null = null, code: string | null = null): ApiError =>
  new ApiError(400, 'invalid_request_error', message, param, code);

export const notFound = (message: string, param: string | null = null, code: string | null = null): ApiError =>
  new ApiError(404, 'not_found_error', message, param, code);

interface AjvError {
  keyword: string;
  instancePath: string;
  message?: string;
  params: Record<string, unknown>;
  parentSchema?: { description?: string };
  data?: unknown;
}

/** "/messages/0/content" -> "messages[0].content" */
export function jsonPointerToParam(pointer: string): string {
  let out = '';
  for (const raw of pointer.split('/').slice(1)) {
    const part = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    out += /^\d+$/.test(part) ? `[${part}]` : out === '' ? part : `.${part}`;
  }
  return out;
}

function describeType(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'string') return 'a string';
  if (typeof v === 'boolean') return 'a boolean';
  if (typeof v === 'number') return Number.isInteger(v) ? 'an integer' : 'a number';
  return typeof v;
}

/** Turns the ajv errors of a failed body validation into one 400 naming the offending field. */
export function schemaError(errors: AjvError[]): ApiError {
  // An anyOf failure lists every branch's complaint first; the outermost anyOf reads best.
  const anyOfs = errors.filter((e) => e.keyword === 'anyOf' || e.keyword === 'oneOf');
  const chosen =
    anyOfs.sort((a, b) => a.instancePath.length - b.instancePath.length)[0] ?? errors[0];
  if (!chosen) return invalidRequest('The request body is invalid.');
  let param = jsonPointerToParam(chosen.instancePath);
  if (chosen.keyword === 'required') {
    const missing = String(chosen.params.missingProperty);
    param = param ? `${param}.${missing}` : missing;
    return invalidRequest(`Missing required parameter: '${param}'.`, param, 'missing_required_parameter');
  }
  if (chosen.keyword === 'additionalProperties') {
    const extra = String(chosen.params.additionalProperty);
    const field = param || 'body';
    return invalidRequest(`Invalid key '${extra}' in '${field}': ${chosen.parentSchema?.description ?? 'not allowed'}.`, param ? `${param}.${extra}` : extra, 'invalid_value');
  }
  if (param === '' && chosen.keyword === 'type') return invalidRequest(`The request body must be a JSON object, got ${describeType(chosen.data)}.`, null, 'invalid_type');
  const expected = chosen.parentSchema?.description ?? chosen.message ?? 'is invalid';
  let got = '';
  if (chosen.keyword === 'type' || anyOfs.length > 0) got = ` (got ${describeType(chosen.data)})`;
  // A limit is quoted with the value that broke it.
  else if ((chosen.keyword === 'maxItems' || chosen.keyword === 'minItems') && Array.isArray(chosen.data)) got = ` (got ${chosen.data.length})`;
  else if (/^(exclusiveM|m)(ax|in)imum$/.test(chosen.keyword) && typeof chosen.data === 'number') got = ` (got ${chosen.data})`;
  const code = chosen.keyword === 'type' || chosen.keyword === 'anyOf' ? 'invalid_type' : 'invalid_value';
  return invalidRequest(`Invalid value for '${param}': ${expected}${got}.`, param, code);
}

const fastifyCodes: Record<string, { status: number; code: string; message: string }> = {
  FST_ERR_CTP_BODY_TOO_LARGE: { status: 413, code: 'request_too_large', message: 'The request body is larger than the server accepts.' },
  FST_ERR_CTP_INVALID_MEDIA_TYPE: { status: 415, code: 'unsupported_media_type', message: "Unsupported Content-Type: send the body as 'application/json'." },
  FST_ERR_CTP_EMPTY_JSON_BODY: { status: 400, code: 'invalid_json', message: 'The request body is empty; send a JSON object.' },
  FST_ERR_CTP_INVALID_JSON_BODY: { status: 400, code: 'invalid_json', message: 'We could not parse the JSON body of your request.' },
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: { status: 400, code: 'invalid_content_length', message: 'Content-Length does not match the body.' },
  FST_ERR_CTP_INVALID_TYPE: { status: 400, code: 'invalid_content_type', message: 'The Content-Type header is invalid.' },
  FST_ERR_CTP_EMPTY_TYPE: { status: 400, code: 'invalid_content_type', message: 'The Content-Type header is empty.' },
  FST_ERR_CTP_INSTANCE_ALREADY_STARTED: { status: 500, code: 'server_error', message: 'Internal server error.' },
};

/** Maps anything thrown inside Fastify onto an ApiError; null only for genuine server faults. */
export function toApiError(err: unknown): ApiError | null {
  if (err instanceof ApiError) return err;
  const fe = err as Partial<FastifyError> & { validation?: AjvError[] };
  if (fe && Array.isArray(fe.validation)) return schemaError(fe.validation);
  if (fe && typeof fe.code === 'string' && fastifyCodes[fe.code]) {
    const m = fastifyCodes[fe.code]!;
    if (m.status >= 500) return null;
    return new ApiError(m.status, 'invalid_request_error', m.message, null, m.code);
  }
  // Other client errors Fastify raises (e.g. a malformed URL) keep their 4xx status, never their internals.
  if (fe && typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return new ApiError(fe.statusCode, 'invalid_request_error', 'The request is malformed.', null, 'bad_request');
  }
  return null;
}

export function serverError(): ApiError {
  return new ApiError(500, 'server_error', 'The server had an error while processing your request.', null, 'internal_error');
}

// The server's public surface: createServer and the interfaces the engine and tokenizer implement.

export { createServer, type ExpertdServer, type ServerOptions } from './app.js';
export type { EngineClient, TextCodec } from './deps.js';
export { ApiError } from './errors.js';

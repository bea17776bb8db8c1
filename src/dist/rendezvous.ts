// The rendezvous through the group's store (store.ts, served by the front): where every rank finds
// the group, publishes its identity and checks everyone's (so a rank with another model or flags is
// refused before any collective), and how rank 0 hands the NCCL unique id to the others. Keys:
//
//   expertd/group              the group's prefix P (a fresh UUID per start of the front)
//   P/identity/<rank>          that rank's RankIdentity (JSON)
//   <gloo prefix>/nccl-id      the NCCL unique id (128 bytes) rank 0 made, for device expert parallelism
import { checkIdentities, type RankIdentity } from './identity.js';
import type { StoreClient } from './store.js';

/** The key the front sets to the group's prefix before any rank starts. */
export const GROUP_KEY = 'expertd/group';

export const identityKey = (prefix: string, rank: number): string => `${prefix}/identity/${rank}`;
export const ncclIdKey = (prefix: string): string => `${prefix}/nccl-id`;

/** The store calls a rendezvous needs (a StoreClient; tests may pass another). */
export type RendezvousStore = Pick<StoreClient, 'set' | 'get' | 'getString'>;

/**
 * A rank's side: reads the group's prefix, publishes this rank's identity, waits (until deadlineMs,
 * a performance.now() time) for every rank's and compares them. Resolves null when all agree, else
 * the sentence naming the first difference; rejects (E_STORE_TIMEOUT naming the missing ranks) when
 * some rank never published.
 */
export async function publishAndCheck(store: RendezvousStore, identity: RankIdentity, worldSize: number,
                                      deadlineMs: number): Promise<{ prefix: string; refused: string | null }> {
  const left = () => Math.max(0, Math.ceil(deadlineMs - performance.now()));
  const prefix = await store.getString(GROUP_KEY, left());
  await store.set(identityKey(prefix, identity.rank), JSON.stringify(identity));
  const ids = await readIdentities(store, prefix, worldSize, left());
  return { prefix, refused: checkIdentities(ids) };
}

/** Every rank's identity from the store, waiting up to timeoutMs; the error names the ranks missing. */
export async function readIdentities(store: RendezvousStore, prefix: string, worldSize: number,
                                     timeoutMs: number): Promise<RankIdentity[]> {
  const got: (RankIdentity | undefined)[] = new Array(worldSize).fill(undefined);
  const results = await Promise.allSettled(Array.from({ length: worldSize }, async (_, r) => {
    got[r] = JSON.parse(await store.getString(identityKey(prefix, r), timeoutMs)) as RankIdentity;
  }));
  const failed = results.findIndex((x) => x.status === 'rejected');
  if (failed >= 0) {
    const missing = got.map((g, r) => (g ? -1 : r)).filter((r) => r >= 0);
    const why = (results[failed] as PromiseRejectedResult).reason as Error & { code?: string };
    const e = new Error(why.code === 'E_STORE_TIMEOUT'
      ? `rank(s) ${missing.join(', ')} did not publish their identity to the store within ${timeoutMs / 1000} s`
      : why.message) as Error & { code?: string };
    e.code = why.code;
    throw e;
  }
  return got as RankIdentity[];
}

/**
 * The NCCL unique id of a group: rank 0 makes it (`make`, ncclGetUniqueId: it names rank 0's
 * bootstrap address) and publishes it; every other rank waits for it up to timeoutMs.
 */
export async function exchangeNcclId(store: RendezvousStore, prefix: string, rank: number, make: () => Uint8Array,
                                     timeoutMs: number): Promise<Uint8Array> {
  if (rank === 0) {
    const id = make();
    await store.set(ncclIdKey(prefix), id);
    return id;
  }
  try {
    return await store.get(ncclIdKey(prefix), timeoutMs);
  } catch (e) {
    const err = e as Error & { code?: string };
    if (err.code !== 'E_STORE_TIMEOUT') throw err;
    const t = new Error(`rank ${rank}: rank 0 did not publish the NCCL unique id within ${timeoutMs / 1000} s`) as Error & { code: string };
    t.code = 'E_STORE_TIMEOUT';
    throw t;
  }
}

// Cuts LeaderWorkerSet's v1 OpenAPI schema out of its CRD into leaderworkerset-v1.schema.json, the
// fixture test/deploy.test.ts validates docker/k8s/expertd-lws.yaml with. The pod templates and
// PVC templates are left open here because the test checks them with kubernetes-models' own
// PodTemplateSpec; descriptions and status are dropped to keep the fixture small.
//   node docker/k8s/schema/make-lws-schema.mjs CRD.yaml SOURCE-NOTE > docker/k8s/schema/leaderworkerset-v1.schema.json
// CRD.yaml: config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml of kubernetes-sigs/lws.
import fs from 'node:fs';
import YAML from 'yaml';

const [crdPath, source] = process.argv.slice(2);
if (!crdPath || !source) {
  console.error('usage: make-lws-schema.mjs CRD.yaml SOURCE-NOTE');
  process.exit(2);
}
const crd = YAML.parse(fs.readFileSync(crdPath, 'utf8'));
const v1 = crd.spec.versions.find((v) => v.name === 'v1');
if (!v1) throw new Error(`${crdPath} has no v1 version`);

const open = { type: 'object', 'x-kubernetes-preserve-unknown-fields': true };
function strip(node, parentKey) {
  if (Array.isArray(node)) return node.map((x) => strip(x, parentKey));
  if (!node || typeof node !== 'object') return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === 'description') continue;
    if (parentKey === 'leaderWorkerTemplate' && key === 'properties') {
      out.properties = Object.fromEntries(Object.entries(value).map(([field, s]) => [field,
        field === 'leaderTemplate' || field === 'workerTemplate' ? open
          : field === 'volumeClaimTemplates' ? { type: 'array', items: open } : strip(s, field)]));
      continue;
    }
    out[key] = strip(value, key === 'properties' || key === 'items' ? parentKey : key);
  }
  return out;
}
const schema = strip(v1.schema.openAPIV3Schema, '');
delete schema.properties.status;
const note = {
  $comment: `LeaderWorkerSet v1 spec schema from ${source} (Apache-2.0), made by docker/k8s/schema/make-lws-schema.mjs: `
    + 'descriptions and status dropped; leaderTemplate, workerTemplate and volumeClaimTemplates left open (the test validates them with kubernetes-models).',
};
process.stdout.write(JSON.stringify({ ...note, ...schema }, null, 1) + '\n');

// Objects of other projects' CRD kinds (Flux, Argo CD, Prometheus Operator) in the rendered chart,
// the GitOps kustomizations and the examples validate against the schemas of the
// @kubernetes-models npm packages (types, enums and required fields; those CRDs allow unknown
// fields). One test per object and validation pass, named as in test_schemas.py.
//
// Run by scripts/chart-checks, which installs the packages under target/tools/crd-models and
// writes the objects (chart_inputs.py models): CHART_CHECKS_MODELS is that JSON file,
// CHART_CHECKS_NODE_MODULES the node_modules directory holding the packages.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the chart tests with \`bash scripts/chart-checks\``);
  return value;
}

const readJson = (path) => JSON.parse(readFileSync(path, "utf8"));
// API group -> npm package, shared with chart_inputs.py
const PACKAGES = readJson(new URL("./model-packages.json", import.meta.url));
const nodeModules = required("CHART_CHECKS_NODE_MODULES");
const cases = readJson(required("CHART_CHECKS_MODELS"));

// The packages are ESM-only and live outside this directory, so a bare `import(pkg/...)` from
// here would not find them: resolve the subpath through the package's own exports map.
async function schemaModule(pkg, apiVersion) {
  const dir = join(nodeModules, pkg);
  const manifest = readJson(join(dir, "package.json"));
  const entry = manifest.exports?.[`./${apiVersion}`];
  const file = typeof entry === "string" ? entry : entry?.import;
  assert.ok(file, `${pkg}@${manifest.version} has no module for ${apiVersion}`);
  return import(pathToFileURL(join(dir, file)).href);
}

for (const { id, object } of cases) {
  test(id, async () => {
    const group = object.apiVersion.split("/")[0];
    const pkg = PACKAGES[group];
    assert.ok(pkg, `no @kubernetes-models package for API group ${group}`);
    const mod = await schemaModule(pkg, object.apiVersion);
    assert.equal(typeof mod[object.kind], "function", `${pkg} has no ${object.kind} in ${object.apiVersion}`);
    try {
      new mod[object.kind](object).validate();
    } catch (e) {
      assert.fail(`${object.apiVersion} ${object.kind} does not validate against the schema of ${pkg}: ${e.message}`);
    }
  });
}

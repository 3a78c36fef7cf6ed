"""What the chart tests read, defined once for pytest, node --test and scripts/chart-checks.

scripts/chart-checks renders the chart and builds the GitOps kustomizations into CHART_CHECKS_WORK
(it asks this module which ones and where, so the lists cannot drift apart), then runs pytest on
tests/chart/ and `node --test tests/chart/crd-models.test.mjs`. Environment it sets:

  CHART_CHECKS_WORK                 scratch directory holding rendered/ and kustomize/
  CHART_CHECKS_KUBERNETES_VERSIONS  e.g. "1.30 1.35": the rendered chart is validated against each,
                                    the examples against the last
  CHART_CHECKS_HELM                 the helm binary (the build tests run lint, package, template)
  CHART_CHECKS_MODELS               JSON file of the objects node validates (written by `models`)
  CHART_CHECKS_NODE_MODULES         node_modules holding the @kubernetes-models packages

Command line (used by scripts/chart-checks):
  chart_inputs.py value-sets        NAME<TAB>VALUES-FILE or -<TAB>OUTPUT<TAB>ERROR-FILE per line
  chart_inputs.py kustomizations    DIR<TAB>OUTPUT<TAB>ERROR-FILE per line
  chart_inputs.py models OUT.json   the objects of other projects' CRD kinds (Flux, Argo CD,
                                    Prometheus Operator), for crd-models.test.mjs
"""
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "regmirror"
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
GITOPS = EXAMPLES / "gitops"
NAMESPACE = "regmirror-system"
DEFAULT = "default"

# API group -> npm package whose schemas validate its kinds (shared with crd-models.test.mjs).
MODEL_PACKAGES = json.loads((HERE / "model-packages.json").read_text())


class InputError(Exception):
    """An input the tests need is missing or cannot be read."""


def env(name):
    value = os.environ.get(name)
    if not value:
        raise InputError(f"{name} is not set: run the chart tests with `bash scripts/chart-checks`")
    return value


def work():
    return Path(env("CHART_CHECKS_WORK"))


def kubernetes_versions():
    versions = env("CHART_CHECKS_KUBERNETES_VERSIONS").split()
    if not versions:
        raise InputError("CHART_CHECKS_KUBERNETES_VERSIONS names no version")
    return versions


def rel(path):
    return Path(path).relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- YAML
class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (the API server refuses them too)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@lru_cache(maxsize=None)
def load(path):
    """The non-empty documents of a YAML file, duplicate keys refused; InputError if unreadable."""
    try:
        with open(path) as f:
            return tuple(d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None)
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: {e}") from e


# ---------------------------------------------------------------- what is rendered and built
def value_sets():
    """(name, values file or None): the chart's defaults and every charts/regmirror/ci/*.yaml."""
    return [(DEFAULT, None)] + [(p.stem, p) for p in sorted((CHART / "ci").glob("*.yaml"))]


def rendered_path(name):
    return work() / "rendered" / f"{name}.yaml"


def output(path):
    """The documents of a file scripts/chart-checks produced (a rendering, a kustomize build);
    InputError with the tool's message if it failed."""
    path = Path(path)
    error = path.with_suffix(".error")
    if error.exists():
        raise InputError(f"{path.name} was not produced:\n{error.read_text().strip()}")
    if not path.exists():
        raise InputError(f"{path} is missing: scripts/chart-checks did not produce it")
    return load(path)


def rendered(name):
    """The objects `helm template` rendered for a value set."""
    return output(rendered_path(name))


def kustomizations():
    """Every directory under examples/gitops holding a kustomization file."""
    names = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
    found = []
    for dirpath, _, files in os.walk(GITOPS):
        found += [Path(dirpath) / f for f in files if f in names]
    return [f.parent for f in sorted(found, key=str)]


def kustomize_path(directory):
    return work() / "kustomize" / f"{rel(directory)}.yaml"


def example_files():
    """examples/*.yaml, every *.yaml under examples/gitops but the kustomizations, and every
    *.yaml under examples/k3s-docs but the k3s-docs.yaml pages."""
    files = [p for p in EXAMPLES.glob("*.yaml") if p.is_file()]
    for base, excluded in ((GITOPS, "kustomization.yaml"), (EXAMPLES / "k3s-docs", "k3s-docs.yaml")):
        for dirpath, _, names in os.walk(base):
            files += [Path(dirpath) / n for n in names if n.endswith(".yaml") and n != excluded]
    return sorted(files, key=str)


# ---------------------------------------------------------------- what is validated
@dataclass(frozen=True)
class Case:
    """One object (or one unreadable file) of one validation pass."""
    label: str          # how messages name the input
    version: str        # Kubernetes version of the pass
    path: Path
    index: int = -1     # document index; -1: the file itself could not be read
    obj: object = None
    error: str = ""     # why the file could not be read

    @property
    def what(self):
        if self.index < 0:
            return self.label
        if not is_object(self.obj):
            return f"{self.label} (document {self.index + 1})"
        name = (self.obj.get("metadata") or {}).get("name", "<no name>")
        return f"{self.label}: {self.obj['kind']}/{name}"

    @property
    def id(self):
        return f"k8s {self.version} | {self.what}"


def is_object(obj):
    return isinstance(obj, dict) and "apiVersion" in obj and "kind" in obj


def group_of(obj):
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


@lru_cache(maxsize=None)
def crd_kinds():
    """(group/version, kind) of every version of every CRD in crds/, with its openAPIV3Schema."""
    kinds = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                kinds[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return kinds


def is_model_kind(obj):
    """True for objects that node validates with the @kubernetes-models schemas."""
    return (is_object(obj) and (obj["apiVersion"], obj["kind"]) not in crd_kinds()
            and group_of(obj) in MODEL_PACKAGES)


def validation_inputs():
    """(label, Kubernetes version, file, produced by chart-checks?) of every validation pass: the
    rendered chart for each version, then each kustomization's output and each example file for
    the last version."""
    versions = kubernetes_versions()
    inputs = [(f"rendered ({name})", v, rendered_path(name), True) for v in versions for name, _ in value_sets()]
    inputs += [(f"kustomize {rel(d)}", versions[-1], kustomize_path(d), True) for d in kustomizations()]
    inputs += [(rel(f), versions[-1], f, False) for f in example_files()]
    return inputs


def validation_cases():
    """Every document of every validation input; a file that cannot be read, or holds no
    document, is one case that fails."""
    cases = []
    for label, version, path, produced in validation_inputs():
        try:
            docs = output(path) if produced else load(path)
        except InputError as e:
            cases.append(Case(label, version, path, error=str(e)))
            continue
        if not docs:
            cases.append(Case(label, version, path, error="no objects"))
        cases += [Case(label, version, path, i, obj) for i, obj in enumerate(docs)]
    return cases


def model_cases():
    """The objects node validates, as written to CHART_CHECKS_MODELS."""
    return [{"id": c.id, "object": c.obj} for c in validation_cases() if is_model_kind(c.obj)]


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "value-sets" and len(argv) == 2:
        for name, values in value_sets():
            out = rendered_path(name)
            print(name, values or "-", out, out.with_suffix(".error"), sep="\t")
    elif command == "kustomizations" and len(argv) == 2:
        for d in kustomizations():
            out = kustomize_path(d)
            print(d, out, out.with_suffix(".error"), sep="\t")
    elif command == "models" and len(argv) == 3:
        cases = model_cases()
        Path(argv[2]).write_text(json.dumps(cases, indent=1))
        print(f"   ok: {len(cases)} object(s) of other projects' CRD kinds for node --test")
    else:
        sys.exit(f"usage: {argv[0]} value-sets | kustomizations | models OUT.json")


if __name__ == "__main__":
    main(sys.argv)

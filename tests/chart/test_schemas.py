"""Every Kubernetes object of the rendered chart (for each Kubernetes version), of each GitOps
kustomization's output and of the example files validates.

Built-in kinds: kubernetes-validate's schemas for the pass's Kubernetes version, strict (unknown
fields are errors). Kinds defined by a CRD in crds/: the CRD's openAPIV3Schema (unknown fields are
errors, as with kubectl's strict field validation) and its x-kubernetes-validations rules (standard
CEL, via cel-python). Kinds of other projects' CRDs (Flux, Argo CD, Prometheus Operator) are not
collected here: crd-models.test.mjs validates them with the @kubernetes-models schemas. Anything
else, documents that are not objects, files that cannot be read, hold no object or repeat a
mapping key fail.
"""
import json
import warnings

import celpy
import jsonschema
import kubernetes_validate
import pytest
from celpy import celtypes

import chart_inputs as inputs

# API group -> reason: objects of these groups are reported as skipped instead of failing for
# want of a schema. Empty: every object is validated.
SKIP_GROUPS = {}


# ---------------------------------------------------------------- CRD schemas -> JSON Schema
def to_json_schema(s):
    """openAPIV3Schema (structural) -> JSON Schema with unknown fields refused."""
    if not isinstance(s, dict):
        return s
    out = {}
    for key, value in s.items():
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "description"):
            continue
        else:
            out[key] = value
    if s.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def top_level_schema(api_version, kind, schema):
    top = to_json_schema(schema)
    top.setdefault("properties", {}).update({
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": {"type": "object"},
    })
    top["required"] = sorted(set(top.get("required", [])) | {"apiVersion", "kind", "metadata"})
    top["additionalProperties"] = False
    return top


cel_env = celpy.Environment()


def cel_rules(schema, value, path, errors, notes):
    """Evaluates x-kubernetes-validations against value, recursively (create: no oldSelf)."""
    if value is None or not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        expr = rule["rule"]
        if "oldSelf" in expr:
            notes.add(f"transition rule not evaluated on create: {expr}")
            continue
        try:
            result = cel_env.program(cel_env.compile(expr)).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # compile error or a function outside standard CEL
            notes.add(f"rule not evaluated by cel-python ({type(e).__name__}): {expr}")
            continue
        if isinstance(result, Exception):
            notes.add(f"rule not evaluated by cel-python ({result}): {expr}")
        elif result is not True and not (isinstance(result, celtypes.BoolType) and bool(result)):
            errors.append(f"{path or '<root>'}: {rule.get('message', 'failed rule: ' + expr)}")
    props = schema.get("properties", {})
    if isinstance(value, dict):
        for k, v in value.items():
            if k in props:
                cel_rules(props[k], v, f"{path}.{k}" if path else k, errors, notes)
            elif isinstance(schema.get("additionalProperties"), dict):
                cel_rules(schema["additionalProperties"], v, f"{path}.{k}" if path else k, errors, notes)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            cel_rules(schema["items"], v, f"{path}[{i}]", errors, notes)


def validate_custom(obj, schema):
    """Errors of obj against its CRD's schema, then (if none) its CEL rules; and notes on rules
    that could not be evaluated."""
    top = top_level_schema(obj["apiVersion"], obj["kind"], schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(top).iter_errors(obj)]
    notes = set()
    if not errors:
        cel_rules(schema, obj, "", errors, notes)
    return errors, notes


# ---------------------------------------------------------------- the tests
CASES = [c for c in inputs.validation_cases() if not inputs.is_model_kind(c.obj)]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_object_validates(case):
    assert not case.error, f"{case.what}: {case.error}"
    obj = case.obj
    assert inputs.is_object(obj), f"{case.what}: not a Kubernetes object (no apiVersion/kind)"
    api, kind = obj["apiVersion"], obj["kind"]
    schema = inputs.crd_kinds().get((api, kind))
    if schema is not None:
        errors, notes = validate_custom(obj, schema)
        for note in sorted(notes):
            warnings.warn(f"{case.what}: {note}")
        assert not errors, f"{case.what} ({api}, CRD schema + CEL rules):\n" + "\n".join(errors)
        return
    try:
        kubernetes_validate.validate(obj, case.version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        group = inputs.group_of(obj)
        if group in SKIP_GROUPS:
            pytest.skip(f"{case.what} ({api}): {SKIP_GROUPS[group]}")
        pytest.fail(f"{case.what}: no schema for {api} {kind} in Kubernetes {case.version} "
                    "and not a known CRD kind", pytrace=False)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "<root>"
        pytest.fail(f"{case.what} ({api}, Kubernetes {e.version}, strict): {where}: {e.message}",
                    pytrace=False)


def test_node_validates_the_other_projects_kinds():
    """The objects scripts/chart-checks handed to crd-models.test.mjs are exactly those this
    module leaves out (so none is validated by neither runner)."""
    handed = json.loads(open(inputs.env("CHART_CHECKS_MODELS")).read())
    expected = json.loads(json.dumps(inputs.model_cases()))
    assert [c["id"] for c in handed] == [c["id"] for c in expected], \
        "CHART_CHECKS_MODELS does not list the objects of other projects' CRD kinds"
    assert handed == expected, "CHART_CHECKS_MODELS holds other contents than the inputs"

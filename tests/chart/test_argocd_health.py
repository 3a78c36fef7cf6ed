"""The Argo CD health check for RegistryMirror (examples/gitops/argocd/argocd-cm-patch.yaml), run
with Lua 5.1 (as Argo CD's gopher-lua) on the statuses the operator reports: each case names the
health status it must map to and a part of the message."""
import lupa.lua51 as lupa
import pytest

import chart_inputs as inputs

PATCH = inputs.GITOPS / "argocd" / "argocd-cm-patch.yaml"
KEY = "resource.customizations.health.regmirror.io_RegistryMirror"


@pytest.fixture(scope="module")
def script():
    data = inputs.load(PATCH)
    assert len(data) == 1, f"{inputs.rel(PATCH)}: expected one ConfigMap patch, found {len(data)} documents"
    assert KEY in data[0].get("data", {}), f"{inputs.rel(PATCH)} has no data.{KEY}"
    return data[0]["data"][KEY]


def mirror(generation=2, observed=2, conditions=None, status=True):
    obj = {"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror",
           "metadata": {"name": "docker-hub", "generation": generation}, "spec": {"registry": "docker.io"}}
    if status:
        obj["status"] = {"observedGeneration": observed, "nodes": {"targeted": 3, "updated": 3, "pending": 0, "failed": 0}}
        if conditions is not None:
            obj["status"]["conditions"] = conditions
    return obj


def cond(type_, status, reason, message="", generation=2):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": "2025-01-01T00:00:00Z"}


READY = [cond("Ready", "True", "Applied", "3/3 nodes applied"), cond("Progressing", "False", "Applied"),
         cond("Degraded", "False", "Applied")]
CASES = [
    ("no status yet", mirror(status=False), "Progressing", "report status"),
    ("status without conditions", mirror(conditions=None), "Progressing", "report status"),
    ("ready", mirror(conditions=READY), "Healthy", "3/3 nodes applied"),
    ("ready but for an older generation", mirror(generation=3, observed=2, conditions=READY), "Progressing", "generation 3"),
    ("conditions of an older generation", mirror(generation=3, observed=3, conditions=READY), "Progressing", "Ready"),
    ("rolling out", mirror(conditions=[cond("Ready", "False", "RollingOut", "1/3 nodes applied"),
                                       cond("Progressing", "True", "RollingOut", "1/3 nodes applied"),
                                       cond("Degraded", "False", "RollingOut")]), "Progressing", "RollingOut: 1/3"),
    ("invalid spec", mirror(conditions=[cond("Ready", "False", "InvalidSpec"), cond("Progressing", "False", "InvalidSpec"),
                                        cond("Degraded", "True", "InvalidSpec",
                                             "spec.endpoints[0].auth.secretRef: Secret regmirror-system/x not found")]),
     "Degraded", "InvalidSpec: spec.endpoints[0].auth.secretRef: Secret regmirror-system/x not found"),
    ("conflict", mirror(conditions=[cond("Degraded", "True", "Conflict", "docker.io is also claimed by hub2")]),
     "Degraded", "Conflict"),
    ("nodes failed while progressing", mirror(conditions=[cond("Progressing", "True", "RollingOut"),
                                                          cond("Degraded", "True", "NodesFailed", "edge-7: k3s did not become Ready")]),
     "Degraded", "NodesFailed: edge-7"),
    ("ready=false without other conditions", mirror(conditions=[cond("Ready", "False", "Paused", "rollout paused")]),
     "Progressing", "Paused: rollout paused"),
    ("ready, some nodes without k3s's embedded registry",
     mirror(conditions=READY + [cond("EmbeddedRegistry", "False", "NotRunning", "1 of 3 k3s/RKE2 node(s) run without it")]),
     "Healthy", "3/3 nodes applied"),
    ("conditions without observedGeneration", mirror(conditions=[{"type": "Ready", "status": "True", "reason": "Applied"}]),
     "Healthy", "Applied"),
]


@pytest.mark.parametrize("obj,want_status,want_message", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_argocd_health(script, obj, want_status, want_message):
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    try:
        hs = lua.execute(script)
    except lupa.LuaError as e:
        pytest.fail(f"Lua error: {e}", pytrace=False)
    got_status, got_message = hs["status"], hs["message"] or ""
    assert got_status == want_status and want_message in got_message, \
        f"expected {want_status} with a message containing {want_message!r}, got {got_status}: {got_message}"

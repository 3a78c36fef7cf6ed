"""The chart's ValidatingAdmissionPolicy (default values), evaluated with cel-python (standard CEL
plus the `join` string extension the API server has) on node updates the agent may and may not
make: test_policy_admits for the updates it must let through, test_policy_denies for those it must
refuse with a message naming the reason. A CEL evaluation error fails the case either way."""
import copy

import celpy
import pytest
from celpy import celtypes

import chart_inputs as inputs

AGENT = f"system:serviceaccount:{inputs.NAMESPACE}:regmirror-agent"
CONFIG_A = "regmirror-config-0123456789abcdef0123"
CONFIG_B = "regmirror-config-fedcba9876543210fedc"
PUBLIC_KEY = "A" * 42 + "E="


def join(lst, sep=celtypes.StringType("")):
    return celtypes.StringType(str(sep).join(str(x) for x in lst))


class Policy:
    """The compiled matchConditions, variables and validations of one ValidatingAdmissionPolicy."""

    def __init__(self, spec):
        self.env = celpy.Environment()
        self.match_conditions = [(m["name"], self.compile(m["expression"])) for m in spec.get("matchConditions", [])]
        self.variables = [(v["name"], self.compile(v["expression"])) for v in spec.get("variables", [])]
        self.validations = [(self.compile(v["expression"]),
                             self.compile(v["messageExpression"]) if "messageExpression" in v else None,
                             v.get("message", "")) for v in spec["validations"]]

    def compile(self, expr):
        return self.env.program(self.env.compile(expr), functions={"join": join})

    def evaluate(self, old, new, user):
        """Returns None when admitted, else the denial messages; raises on CEL errors."""
        request = {"operation": "UPDATE", "userInfo": user, "name": new["metadata"]["name"]}
        act = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
               "request": celpy.json_to_cel(request)}
        for name, prg in self.match_conditions:
            r = prg.evaluate(act)
            if not isinstance(r, celtypes.BoolType):
                raise RuntimeError(f"matchCondition {name}: {r!r}")
            if not r:
                return None  # policy does not apply
        var = {}
        act["variables"] = celtypes.MapType()
        for name, prg in self.variables:
            r = prg.evaluate(act)
            if isinstance(r, Exception):
                raise RuntimeError(f"variable {name}: {r!r}")
            var[celtypes.StringType(name)] = r
            act["variables"] = celtypes.MapType(var)
        denials = []
        for prg, msg_prg, msg in self.validations:
            r = prg.evaluate(act)
            if not isinstance(r, celtypes.BoolType):
                raise RuntimeError(f"validation returned {r!r}")
            if not r:
                if msg_prg is not None:
                    m = msg_prg.evaluate(act)
                    if not isinstance(m, str):
                        raise RuntimeError(f"messageExpression returned {m!r}")
                    msg = str(m)
                denials.append(msg)
        return denials or None


NODE = {
    "apiVersion": "v1", "kind": "Node",
    "metadata": {
        "name": "node-1",
        "labels": {"kubernetes.io/hostname": "node-1", "node-role.kubernetes.io/control-plane": "true"},
        "annotations": {"regmirror.io/desired-config": CONFIG_A,
                        "k3s.io/node-args": "[\"server\"]"},
    },
    "spec": {"podCIDR": "10.42.0.0/24",
             "taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
}


def user(node="node-1", name=AGENT):
    u = {"username": name, "uid": "u", "groups": ["system:serviceaccounts"]}
    if node is not None:
        u["extra"] = {"authentication.kubernetes.io/node-name": [node],
                      "authentication.kubernetes.io/pod-name": ["regmirror-agent-abcde"]}
    return u


def changed(base=NODE, **edits):
    n = copy.deepcopy(base)
    for path, value in edits.items():
        *parents, leaf = path.split("__")
        obj = n
        for p in parents:
            obj = obj.setdefault(p, {})
        if value is None:
            obj.pop(leaf, None)
        else:
            obj[leaf] = value
    return n


def annotate(base=NODE, drop=(), **ann):
    n = copy.deepcopy(base)
    a = n["metadata"].setdefault("annotations", {})
    for k in drop:
        a.pop(k, None)
    a.update({k.replace("_", "/", 1).replace("_", "-"): v for k, v in ann.items()})
    return n


BARE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {}}
APPLIED = annotate(**{"regmirror.io_current_config": CONFIG_A, "regmirror.io_state": "Applied",
                      "regmirror.io_flavor": "k3s", "regmirror.io_message": ""})

# (name, old, new, userInfo, expected: None = admitted, else a substring of a denial message)
CASES = [
    ("agent reports state on its own node", NODE, APPLIED, user(), None),
    ("agent reports on a node without annotations or labels", BARE,
     annotate(BARE, **{"regmirror.io_state": "Unsupported", "regmirror.io_message": "external runtime"}), user(), None),
    ("agent clears its message", APPLIED, annotate(APPLIED, drop=["regmirror.io/message"]), user(), None),
    ("agent's no-op update", APPLIED, APPLIED, user(), None),
    ("agent removes all its annotations (old had only those)",
     annotate(BARE, **{"regmirror.io_state": "Applied"}), BARE, user(), None),
    ("operator (another user) changes desired-config", NODE,
     annotate(**{"regmirror.io_desired_config": CONFIG_B}), user(name="system:serviceaccount:regmirror-system:regmirror-operator"), None),
    ("kubelet updates labels", NODE, changed(metadata__labels={"a": "b"}), user(node=None, name="system:node:node-1"), None),
    ("agent of another node", NODE, APPLIED, user(node="node-2"), "on node node-2 may not update Node node-1"),
    ("agent token without node binding (no extra)", NODE, APPLIED, user(node=None), "token names no node"),
    ("agent token with extra but no node-name", NODE, APPLIED,
     dict(user(node=None), extra={"authentication.kubernetes.io/pod-name": ["p"]}), "token names no node"),
    ("agent token with an empty node-name list", NODE, APPLIED,
     dict(user(node=None), extra={"authentication.kubernetes.io/node-name": []}), "token names no node"),
    ("agent changes a label", NODE, changed(metadata__labels={"kubernetes.io/hostname": "node-1"}), user(), "labels"),
    ("agent adds a label to a node without labels", BARE, changed(BARE, metadata__labels={"x": "y"}), user(), "labels"),
    ("agent removes all labels", NODE, changed(metadata__labels=None), user(), "labels"),
    ("agent adds a taint", NODE, changed(spec__taints=NODE["spec"]["taints"] + [{"key": "x", "effect": "NoExecute"}]), user(), "spec"),
    ("agent removes the taints", NODE, changed(spec__taints=None), user(), "spec"),
    ("agent cordons the node", NODE, changed(spec__unschedulable=True), user(), "spec"),
    ("agent adds a finalizer", NODE, changed(metadata__finalizers=["x"]), user(), "finalizers"),
    ("agent forges desired-config", APPLIED, annotate(APPLIED, **{"regmirror.io_desired_config": "regmirror-config-evil"}), user(),
     "regmirror.io/desired-config"),
    ("agent removes desired-config", APPLIED, annotate(APPLIED, drop=["regmirror.io/desired-config"]), user(),
     "only the operator writes regmirror.io/desired-config"),
    ("agent changes a foreign annotation", APPLIED, annotate(APPLIED, **{"k3s.io_node_args": "[]"}), user(), "not: k3s.io/node-args"),
    ("agent adds a foreign annotation", NODE, annotate(**{"example.com_x": "1", "regmirror.io_state": "Applied"}), user(), "not: example.com/x"),
    ("agent removes all annotations", NODE, changed(metadata__annotations=None), user(), "regmirror.io/desired-config"),
    ("agent publishes its public key", APPLIED, annotate(APPLIED, **{"regmirror.io_public_key": PUBLIC_KEY}), user(), None),
    ("agent names a Helm release Secret as its current config", APPLIED,
     annotate(APPLIED, **{"regmirror.io_current_config": "sh.helm.release.v1.regmirror.v1"}), user(), "must name a config Secret"),
    ("agent names a credential Secret as its current config", APPLIED,
     annotate(APPLIED, **{"regmirror.io_current_config": "mirror-pull"}), user(), "must name a config Secret"),
    ("agent names a config with upper-case digits", APPLIED,
     annotate(APPLIED, **{"regmirror.io_current_config": CONFIG_A.upper()}), user(), "must name a config Secret"),
    ("agent reports a state of its own invention", APPLIED, annotate(APPLIED, **{"regmirror.io_state": "Pwned"}), user(),
     "regmirror.io/state must be"),
    ("agent publishes a public key that is not one", APPLIED, annotate(APPLIED, **{"regmirror.io_public_key": "not-a-key"}), user(),
     "regmirror.io/public-key must be"),
    ("agent forges desired-activation", APPLIED, annotate(APPLIED, **{"regmirror.io_desired_activation": "Restart"}), user(),
     "may not change regmirror.io/desired-activation"),
    ("agent forges its config key", APPLIED, annotate(APPLIED, **{"regmirror.io_config_key": "v1.x.y.z"}), user(),
     "may not change regmirror.io/config-key"),
]


@pytest.fixture(scope="module")
def policy():
    try:
        docs = inputs.rendered(inputs.DEFAULT)
    except inputs.InputError as e:
        pytest.fail(str(e), pytrace=False)
    policies = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"]
    assert len(policies) == 1, \
        f"expected one ValidatingAdmissionPolicy in the default rendering, found {len(policies)}"
    return Policy(policies[0]["spec"])


def outcome(denials):
    return "admitted" if denials is None else "denied: " + " | ".join(denials)


@pytest.mark.parametrize("old,new,user_info", [pytest.param(*c[1:4], id=c[0]) for c in CASES if c[4] is None])
def test_policy_admits(policy, old, new, user_info):
    denials = policy.evaluate(old, new, user_info)
    assert denials is None, f"must be admitted, was {outcome(denials)}"


@pytest.mark.parametrize("old,new,user_info,expected",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES if c[4] is not None])
def test_policy_denies(policy, old, new, user_info, expected):
    denials = policy.evaluate(old, new, user_info)
    assert denials is not None and any(expected in d for d in denials), \
        f"must be denied with a message containing {expected!r}, was {outcome(denials)}"

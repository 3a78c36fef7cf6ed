"""Properties of the rendered chart that a schema cannot see: least-privilege RBAC, the host paths
the agent gets, the pods' security settings, explicit namespaces. Each test runs on every
rendering (default values and every charts/regmirror/ci/*.yaml) unless it names the values it
needs; the tests named *_defaults check what only the default values promise."""
import pytest

import chart_inputs as inputs

NAMESPACE = inputs.NAMESPACE
AGENT_ROLE = "regmirror-agent-configs"
AGENT_USER = f"system:serviceaccount:{NAMESPACE}:regmirror-agent"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
RENDERINGS = [name for name, _ in inputs.value_sets()]


def docs(rendering):
    try:
        return inputs.rendered(rendering)
    except inputs.InputError as e:
        pytest.fail(f"rendering {rendering}: {e}", pytrace=False)


def find(rendering, kind, name, ns=None):
    for d in docs(rendering):
        m = d["metadata"]
        if d["kind"] == kind and m["name"] == name and (ns is None or m.get("namespace") == ns):
            return d
    pytest.fail(f"{kind} {ns + '/' if ns else ''}{name} is not rendered ({rendering} values)", pytrace=False)


def objects(select):
    """Parameters (rendering, document index) of the rendered objects select(object) accepts; a
    rendering that cannot be read is one parameter (rendering, -1), which fails."""
    params = []
    for rendering in RENDERINGS:
        try:
            rendered = inputs.rendered(rendering)
        except inputs.InputError:
            params.append(pytest.param(rendering, -1, id=f"{rendering}: unreadable"))
            continue
        for i, d in enumerate(rendered):
            if select(d):
                m = d["metadata"]
                where = f"{m['namespace']}/" if m.get("namespace") else ""
                params.append(pytest.param(rendering, i, id=f"{rendering}: {d['kind']} {where}{m['name']}"))
    return params


def doc(rendering, index):
    rendered = docs(rendering)
    assert index >= 0, f"rendering {rendering} cannot be read"
    return rendered[index]


def rules(obj):
    return sorted((tuple(r.get("apiGroups", [])), tuple(r.get("resources", [])),
                   tuple(r.get("resourceNames", [])), tuple(sorted(r.get("verbs", []))))
                  for r in obj.get("rules", []))


def r(groups, resources, verbs, names=()):
    return (tuple(groups), tuple(resources), tuple(names), tuple(sorted(verbs)))


# ---------------------------------------------------------------- every object
@pytest.mark.parametrize("rendering,index", objects(lambda d: d["kind"] not in CLUSTER_SCOPED))
def test_namespaced_object_names_its_namespace(rendering, index):
    d = doc(rendering, index)
    assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no explicit namespace"


@pytest.mark.parametrize("rendering,index", objects(lambda d: d["kind"] in ("Role", "ClusterRole")))
def test_rbac_rules_have_no_wildcard_or_escalation(rendering, index):
    d = doc(rendering, index)
    what = f"{d['kind']} {d['metadata']['name']}"
    for i, rule in enumerate(d.get("rules", [])):
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"{what}: wildcard in {field} of rules[{i}]"
        assert not {"escalate", "bind", "impersonate"} & set(rule.get("verbs", [])), \
            f"{what}: escalate/bind/impersonate verb in rules[{i}]"


@pytest.mark.parametrize("rendering,index", objects(lambda d: d["kind"] == "ClusterRole"))
def test_clusterrole_grants_no_secrets_or_configmaps(rendering, index):
    d = doc(rendering, index)
    for i, rule in enumerate(d["rules"]):
        assert not {"secrets", "configmaps"} & set(rule["resources"]), \
            f"ClusterRole {d['metadata']['name']} grants secrets/configmaps cluster-wide (rules[{i}])"


@pytest.mark.parametrize("rendering,index", objects(
    lambda d: d["kind"] == "Role" and d["metadata"]["name"] == "regmirror-operator-references"))
def test_references_role_reads_only_secrets_and_configmaps_outside_the_release_namespace(rendering, index):
    d = doc(rendering, index)
    ns = d["metadata"]["namespace"]
    assert rules(d) == [r([""], ["secrets", "configmaps"], ["get", "list", "watch"])], \
        f"Role {ns}/regmirror-operator-references rules differ: {rules(d)}"
    assert ns != NAMESPACE, "allowedNamespaces Role rendered in the release namespace"


# ---------------------------------------------------------------- RBAC, exactly
@pytest.mark.parametrize("rendering", RENDERINGS)
def test_operator_clusterrole_is_least_privilege(rendering):
    got = rules(find(rendering, "ClusterRole", "regmirror-operator"))
    assert got == sorted([
        r(["regmirror.io"], ["registrymirrors"], ["get", "list", "watch"]),
        r(["regmirror.io"], ["registrymirrors/status"], ["get", "patch", "update"]),
        r([""], ["nodes"], ["get", "list", "watch", "patch"]),
    ]), f"ClusterRole regmirror-operator rules differ from the least-privilege set: {got}"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_clusterrole_is_least_privilege(rendering):
    got = rules(find(rendering, "ClusterRole", "regmirror-agent"))
    assert got == [r([""], ["nodes"], ["get", "list", "watch", "patch"])], \
        f"ClusterRole regmirror-agent rules differ from the least-privilege set: {got}"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_operator_role_is_least_privilege(rendering):
    got = rules(find(rendering, "Role", "regmirror-operator", NAMESPACE))
    assert got == sorted([
        r([""], ["secrets"], ["get", "list", "watch", "create", "delete"]),
        r([""], ["configmaps"], ["get", "list", "watch"]),
        r(["coordination.k8s.io"], ["leases"], ["create"]),
        r(["coordination.k8s.io"], ["leases"], ["get", "patch"], ["regmirror-controller"]),
        r(["rbac.authorization.k8s.io"], ["roles"], ["create"]),
        r(["rbac.authorization.k8s.io"], ["roles"], ["get", "list", "watch", "update", "patch"], [AGENT_ROLE]),
    ]), f"Role {NAMESPACE}/regmirror-operator rules differ from the least-privilege set: {got}"


def cache_namespace(rendering):
    return "mirror-caches" if rendering == "everything-values" else "regmirror-cache"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_caches_run_in_a_restricted_namespace_of_their_own(rendering):
    ns = cache_namespace(rendering)
    namespace = find(rendering, "Namespace", ns, None)
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", \
            f"Namespace {ns}: Pod Security {mode} must be restricted (the operator makes Deployments there): {labels}"
    got = rules(find(rendering, "Role", "regmirror-operator-caches", ns))
    assert got == sorted([
        r([""], ["secrets"], ["get", "list", "watch", "create", "patch", "delete"]),
        r([""], ["services"], ["list", "watch", "create", "patch", "delete"]),
        r(["apps"], ["deployments"], ["list", "watch", "create", "patch", "delete"]),
    ]), f"Role {ns}/regmirror-operator-caches rules differ: {got}"
    binding = find(rendering, "RoleBinding", "regmirror-operator-caches", ns)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "regmirror-operator", "namespace": NAMESPACE}], binding
    # Nowhere else may the operator make workloads or Services.
    for d in docs(rendering):
        if d["kind"] in ("Role", "ClusterRole") and d["metadata"]["name"] != "regmirror-operator-caches":
            for rule in d.get("rules", []):
                assert not {"deployments", "services", "pods", "daemonsets", "statefulsets", "jobs"} & set(rule["resources"]) \
                    or d["metadata"]["name"].startswith("regmirror-uninstall"), \
                    f"{d['kind']} {d['metadata']['name']} grants {rule}"
    _, _, c = operator(rendering)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["REGMIRROR_CACHE_NAMESPACE"] == ns, env
    want_image = ("registry.example.com/mirror/registry@sha256:" + "1" * 64
                  if rendering == "everything-values" else "docker.io/library/registry:3")
    assert env["REGMIRROR_CACHE_IMAGE"] == want_image, env


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_events_role_creates_events_only(rendering):
    got = rules(find(rendering, "Role", "regmirror-events", "default"))
    assert got == sorted([
        r(["events.k8s.io"], ["events"], ["create"]),
    ]), f"Role default/regmirror-events rules differ: {got}"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_configs_role_is_left_to_the_operator(rendering):
    assert not [d for d in docs(rendering) if d["kind"] == "Role" and d["metadata"]["name"] == AGENT_ROLE], \
        f"the chart must not render Role {AGENT_ROLE} (the operator owns it)"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_configs_rolebinding_binds_the_agent(rendering):
    binding = find(rendering, "RoleBinding", AGENT_ROLE, NAMESPACE)
    assert (binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_ROLE}
            and binding["subjects"] == [{"kind": "ServiceAccount", "name": "regmirror-agent", "namespace": NAMESPACE}]), \
        f"RoleBinding {AGENT_ROLE} must bind regmirror-agent to Role {AGENT_ROLE}: {binding}"


# ---------------------------------------------------------------- operator
def operator(rendering):
    dep = find(rendering, "Deployment", "regmirror-operator", NAMESPACE)
    pod = dep["spec"]["template"]["spec"]
    return dep, pod, pod["containers"][0]


def test_operator_defaults():
    dep, _, c = operator(inputs.DEFAULT)
    assert dep["spec"]["replicas"] == 2, f"operator replicas {dep['spec']['replicas']} != 2"
    assert c["image"] == "ghcr.io/regmirror/regmirror:0.1.0", f"operator image {c['image']}"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["REGMIRROR_CACHE_IMAGE"] == "docker.io/library/registry:3", \
        f"the caches' image defaults to distribution v3, fully qualified (CRI-O has no short names): {env}"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_operator_container(rendering):
    _, pod, c = operator(rendering)
    assert c["args"] == ["controller"], f"operator args {c['args']} != [controller]"
    assert pod["serviceAccountName"] == "regmirror-operator", f"operator ServiceAccount {pod['serviceAccountName']}"
    env = {e["name"]: e for e in c["env"]}
    for name in ("POD_NAMESPACE", "POD_NAME", "REGMIRROR_ALLOWED_NAMESPACES", "REGMIRROR_MAX_UNAVAILABLE",
                 "REGMIRROR_AGENT_ROLE", "REGMIRROR_CACHE_IMAGE", "RUST_LOG"):
        assert name in env, f"operator env {name} missing"
    assert env.get("REGMIRROR_AGENT_ROLE", {}).get("value") == AGENT_ROLE, \
        f"operator env REGMIRROR_AGENT_ROLE != {AGENT_ROLE}"
    ports = [(p["name"], p["containerPort"]) for p in c["ports"]]
    assert ports == [("http-metrics", 8080)], f"operator ports {ports}"
    assert (c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            and c["readinessProbe"]["httpGet"]["path"] == "/readyz"), "operator probes: /healthz and /readyz"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_operator_security_context(rendering):
    _, pod, c = operator(rendering)
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True, "operator must run as non-root"
    assert sc.get("readOnlyRootFilesystem") is True, "operator root fs must be read-only"
    assert sc.get("allowPrivilegeEscalation") is False, "operator allowPrivilegeEscalation must be false"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add"), \
        "operator must drop ALL capabilities and add none"
    assert (psc.get("seccompProfile") or sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", \
        "operator seccomp profile must be RuntimeDefault"


# ---------------------------------------------------------------- agent
def agent(rendering):
    ds = find(rendering, "DaemonSet", "regmirror-agent", NAMESPACE)
    pod = ds["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def host_mounts(pod, c):
    """(volume, mount) of every hostPath volume mount."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return [(volumes[m["name"]], m) for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]]]


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_container(rendering):
    pod, c = agent(rendering)
    assert c["command"] == ["regmirror-agent"] and c["args"] == ["run"], \
        f"agent command/args {c['command']} {c['args']} != [regmirror-agent] [run]"
    assert pod["serviceAccountName"] == "regmirror-agent", f"agent ServiceAccount {pod['serviceAccountName']}"
    env = {e["name"]: e for e in c["env"]}
    for name in ("NODE_NAME", "POD_NAMESPACE", "REGMIRROR_FLAVOR", "REGMIRROR_READY_TIMEOUT", "RUST_LOG"):
        assert name in env, f"agent env {name} missing"
    assert env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName", \
        "agent env NODE_NAME must come from spec.nodeName"
    ports = [(p["name"], p["containerPort"]) for p in c["ports"]]
    assert ports == [("http-metrics", 8081)], f"agent ports {ports}"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_security_context(rendering):
    pod, c = agent(rendering)
    sc = c.get("securityContext", {})
    assert not pod.get("hostNetwork"), "agent must not use hostNetwork"
    assert not pod.get("hostIPC"), "agent must not use hostIPC"
    assert sc.get("privileged") is not True, "agent must not be privileged"
    assert sc.get("allowPrivilegeEscalation") is False, "agent allowPrivilegeEscalation must be false"
    assert sc.get("readOnlyRootFilesystem") is True, "agent root fs must be read-only"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add"), \
        "agent must drop ALL capabilities and add none"


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_agent_host_paths_are_mounted_once_under_host(rendering):
    pod, c = agent(rendering)
    mounts = host_mounts(pod, c)
    roots = set()  # agent.hostRoot: every host path is <hostRoot><path>, mounted at /host<path>
    for v, m in mounts:
        path, inside = v["hostPath"]["path"], m["mountPath"]
        assert inside.startswith("/host/") and path.endswith(inside[len("/host"):]), \
            f"host path {path} mounted at {inside}, not at /host<path>"
        roots.add(path[: len(path) - len(inside[len("/host"):])])
    assert len(roots) <= 1, f"host paths under different roots: {sorted(roots)}"
    paths = {v["hostPath"]["path"] for v, _ in mounts}
    assert len(paths) == len([v for v in pod["volumes"] if "hostPath" in v]), "a hostPath volume is not mounted once"


def test_agent_defaults():
    pod, c = agent(inputs.DEFAULT)
    sc = c.get("securityContext", {})
    assert pod.get("hostPID") is False, "agent hostPID must default to false"
    assert c["image"] == "ghcr.io/regmirror/regmirror-agent:0.1.0", f"agent image {c['image']}"
    assert pod.get("tolerations") == [{"operator": "Exists"}], "agent must tolerate every taint by default"
    assert sc.get("runAsUser") == 0, "agent runs as uid 0"


def test_agent_host_paths_defaults():
    pod, c = agent(inputs.DEFAULT)
    host = {v["hostPath"]["path"]: bool(m.get("readOnly")) for v, m in host_mounts(pod, c)}
    expected = {p: False for p in ("/etc/rancher", "/var/lib/rancher", "/etc/containerd", "/etc/containers",
                                   "/etc/crio", "/var/lib/regmirror", "/run/dbus")}
    expected.update({p: True for p in ("/etc/systemd/system", "/usr/lib/systemd/system",
                                       "/usr/local/lib/systemd/system")})
    assert host == expected, "agent host paths (path: read-only) differ from the defaults"


# ---------------------------------------------------------------- admission policy
def with_policy(rendering):
    try:
        return any(d["kind"] == "ValidatingAdmissionPolicy" for d in inputs.rendered(rendering))
    except inputs.InputError:
        return True  # the test fails reading it


@pytest.mark.parametrize("rendering", [r for r in RENDERINGS if r == inputs.DEFAULT or with_policy(r)])
def test_admission_policy_applies_to_the_agent_and_is_bound(rendering):
    """Every rendering with the policy (the default values must have it)."""
    vap = [d for d in docs(rendering) if d["kind"] == "ValidatingAdmissionPolicy"]
    assert vap, f"admission policy missing from the {rendering} rendering"
    assert any(AGENT_USER in m["expression"] for m in vap[0]["spec"]["matchConditions"]), \
        f"admission policy does not match {AGENT_USER}"
    b = find(rendering, "ValidatingAdmissionPolicyBinding", vap[0]["metadata"]["name"])
    assert b["spec"]["policyName"] == vap[0]["metadata"]["name"], "policy binding names the policy"


# ---------------------------------------------------------------- uninstall cleanup hook
HOOK = "regmirror-uninstall-cleanup"
HOOK_DELETE_POLICY = "before-hook-creation,hook-succeeded"


def hook_objects(rendering):
    return [d for d in docs(rendering) if d["metadata"]["name"] == HOOK]


def with_hook(rendering):
    try:
        return bool(hook_objects(rendering))
    except BaseException:  # an unreadable rendering fails in the test
        return True


HOOK_RENDERINGS = [r for r in RENDERINGS if r == inputs.DEFAULT or with_hook(r)]


@pytest.mark.parametrize("rendering", HOOK_RENDERINGS)
def test_uninstall_cleanup_hook_objects_are_pre_delete_hooks_in_order(rendering):
    """On by default: ServiceAccount and Role, then the RoleBinding, then the Job, each a
    pre-delete hook deleted once it succeeded (or before it is made again)."""
    objects = {d["kind"]: d for d in hook_objects(rendering)}
    assert sorted(objects) == ["Job", "Role", "RoleBinding", "ServiceAccount"], \
        f"{HOOK} objects ({rendering} values): {sorted(objects)}"
    weights = {}
    for kind, d in objects.items():
        a = d["metadata"].get("annotations", {})
        assert a.get("helm.sh/hook") == "pre-delete", f"{kind} {HOOK}: helm.sh/hook {a.get('helm.sh/hook')}"
        assert a.get("helm.sh/hook-delete-policy") == HOOK_DELETE_POLICY, \
            f"{kind} {HOOK}: hook-delete-policy {a.get('helm.sh/hook-delete-policy')}"
        assert d["metadata"]["namespace"] == NAMESPACE, f"{kind} {HOOK} outside {NAMESPACE}"
        weights[kind] = int(a["helm.sh/hook-weight"])
    assert weights["ServiceAccount"] < weights["RoleBinding"] < weights["Job"] \
        and weights["Role"] < weights["RoleBinding"], f"{HOOK} hook weights: RBAC before the Job: {weights}"


@pytest.mark.parametrize("rendering", HOOK_RENDERINGS)
def test_uninstall_cleanup_role_is_least_privilege(rendering):
    got = rules(find(rendering, "Role", HOOK, NAMESPACE))
    assert got == sorted([
        r(["apps"], ["daemonsets"], ["get", "patch"], ["regmirror-agent"]),
        r(["apps"], ["deployments/scale"], ["get", "patch"], ["regmirror-operator"]),
    ]), f"Role {NAMESPACE}/{HOOK} rules differ from the least-privilege set: {got}"
    binding = find(rendering, "RoleBinding", HOOK, NAMESPACE)
    assert (binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": HOOK}
            and binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}]), \
        f"RoleBinding {HOOK} must bind ServiceAccount {HOOK} to Role {HOOK}: {binding}"


@pytest.mark.parametrize("rendering", HOOK_RENDERINGS)
def test_uninstall_cleanup_job_runs_the_operator_image(rendering):
    job = find(rendering, "Job", HOOK, NAMESPACE)
    pod = job["spec"]["template"]["spec"]
    _, operator_pod, operator_container = operator(rendering)
    (c,) = pod["containers"]
    assert c["image"] == operator_container["image"], f"hook image {c['image']} is not the operator's"
    assert "command" not in c, "the operator image's entrypoint is regmirror"
    assert c["args"][:6] == ["uninstall-cleanup", f"--namespace={NAMESPACE}", "--daemonset=regmirror-agent",
                             "--container=agent", "--deployment=regmirror-operator", c["args"][5]] \
        and c["args"][5].startswith("--timeout="), f"hook args {c['args']}"
    timeout = int(c["args"][5].removeprefix("--timeout="))
    assert job["spec"]["activeDeadlineSeconds"] > timeout, \
        f"activeDeadlineSeconds {job['spec']['activeDeadlineSeconds']} must exceed --timeout {timeout}"
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never", "one try, its log kept"
    assert pod["serviceAccountName"] == HOOK, f"hook ServiceAccount {pod['serviceAccountName']}"
    assert pod["securityContext"] == operator_pod["securityContext"] \
        and c["securityContext"] == operator_container["securityContext"], "hook runs as locked down as the operator"
    # What the hook patches: container agent, and the hostPath volume at /host/var/lib/regmirror,
    # which the cleanup pods mount one level up to delete the state directory.
    agent_pod, agent_container = agent(rendering)
    assert agent_container["name"] == "agent", "the hook patches container agent"
    state = [(v, m) for v, m in host_mounts(agent_pod, agent_container) if m["mountPath"] == "/host/var/lib/regmirror"]
    assert len(state) == 1 and state[0][0]["hostPath"]["path"].endswith("/var/lib/regmirror"), \
        f"the agent's state volume (hostPath .../var/lib/regmirror at /host/var/lib/regmirror): {state}"


def test_uninstall_cleanup_defaults():
    job = find(inputs.DEFAULT, "Job", HOOK, NAMESPACE)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--timeout=180" in args and job["spec"]["activeDeadlineSeconds"] == 240, \
        f"default timeout/deadline: {args} {job['spec']['activeDeadlineSeconds']}"


def test_uninstall_cleanup_off_renders_nothing_of_it():
    """ci/minimal-values.yaml turns cleanupOnUninstall off."""
    assert hook_objects("minimal-values") == [], f"cleanupOnUninstall.enabled=false still renders {HOOK}"
    assert "minimal-values" not in HOOK_RENDERINGS

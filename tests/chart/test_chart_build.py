"""The chart builds: charts/regmirror/crds/ is an exact copy of crds/; helm lint --strict passes
with the default values and every charts/regmirror/ci/*.yaml while values.schema.json is
enforced; helm template rendered every value set (scripts/chart-checks renders them for the other
tests) and refuses Kubernetes < 1.30; helm package keeps the CRD and leaves ci/ out; kubectl
kustomize built every kustomization under examples/gitops."""
import subprocess
import tarfile

import pytest

import chart_inputs as inputs

CHART_CRDS = inputs.CHART / "crds"


def helm(*args):
    return subprocess.run([inputs.env("CHART_CHECKS_HELM"), *map(str, args)], capture_output=True, text=True)


def output_of(run):
    return (run.stdout + run.stderr).strip()


# ---------------------------------------------------------------- CRDs
# charts/regmirror/crds/ holds a COPY of crds/, not a symlink: helm itself follows symlinks, but
# Flux builds charts from a GitRepository artifact, which does not keep symlinks.
@pytest.mark.parametrize("crd", sorted(inputs.CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_chart_crd_is_a_copy(crd):
    copy = CHART_CRDS / crd.name
    fix = f"cp crds/{crd.name} charts/regmirror/crds/"
    assert copy.is_file() and not copy.is_symlink(), f"{inputs.rel(copy)} is missing (or a symlink): {fix}"
    assert copy.read_bytes() == crd.read_bytes(), f"{inputs.rel(copy)} differs from crds/{crd.name}: {fix}"


@pytest.mark.parametrize("copy", sorted(CHART_CRDS.iterdir()), ids=lambda p: p.name)
def test_chart_crd_has_a_source(copy):
    assert (inputs.CRDS / copy.name).is_file(), f"{inputs.rel(copy)} has no counterpart in crds/"


# ---------------------------------------------------------------- lint, template, package
@pytest.mark.parametrize("values", [v for _, v in inputs.value_sets()],
                         ids=[f"ci/{v.name}" if v else name for name, v in inputs.value_sets()])
def test_helm_lint_strict(values):
    run = helm("lint", "--strict", inputs.CHART, "--namespace", inputs.NAMESPACE, *(["-f", values] if values else []))
    assert run.returncode == 0, f"helm lint --strict failed:\n{output_of(run)}"


def test_values_schema_is_enforced():
    run = helm("lint", "--strict", inputs.CHART, "--set", "agent.flavor=docker")
    assert run.returncode != 0, "helm lint accepted agent.flavor=docker: values.schema.json is not enforced"


def test_events_go_to_default_only():
    # The code records Events about cluster-scoped objects in default: a value granting them
    # elsewhere would leave every Event forbidden.
    run = helm("lint", "--strict", inputs.CHART, "--set", "events.namespace=kube-system")
    assert run.returncode != 0, f"helm lint accepted events.namespace=kube-system:\n{output_of(run)}"


def test_the_caches_namespace_is_never_the_release_namespace():
    # The caches' namespace is Pod Security restricted; the agent's cannot be.
    run = helm("template", "r", inputs.CHART, "-n", "regmirror-system", "--set", "cache.namespace=regmirror-system")
    assert run.returncode != 0 and "cache.namespace must not be the release namespace" in output_of(run), \
        output_of(run)


def test_an_upgrade_without_the_cache_values_says_how_to_get_them():
    # `helm upgrade --reuse-values` from a release before the caches leaves `cache` out.
    run = helm("template", "r", inputs.CHART, "-n", "regmirror-system", "--set", "cache=null")
    assert run.returncode != 0 and "--reset-then-reuse-values" in output_of(run), output_of(run)


@pytest.mark.parametrize("flavor,accepted", [("k3s+embedded-registry", True), ("rke2+embedded-registry", True),
                                             ("containerd:/opt/certs.d", True),
                                             ("containerd+embedded-registry", False), ("k3s+spegel", False)])
def test_agent_flavors_the_agent_takes(flavor, accepted):
    run = helm("lint", "--strict", inputs.CHART, "--set", f"agent.flavor={flavor}")
    assert (run.returncode == 0) == accepted, \
        f"agent.flavor={flavor}: helm lint {'refused' if accepted else 'accepted'} it:\n{output_of(run)}"


@pytest.mark.parametrize("name", [name for name, _ in inputs.value_sets()])
def test_helm_template_renders(name):
    try:
        objects = inputs.rendered(name)
    except inputs.InputError as e:
        pytest.fail(f"helm template ({name} values): {e}", pytrace=False)
    assert objects, f"helm template ({name} values) rendered no object"


def test_kubernetes_older_than_1_30_is_refused():
    """kubeVersion >= 1.30: admission policy v1, node name in tokens."""
    run = helm("template", "regmirror", inputs.CHART, "--namespace", inputs.NAMESPACE, "--kube-version", "1.29.0")
    assert run.returncode != 0, "helm template accepted Kubernetes 1.29"
    assert "kubeVersion" in run.stderr, f"unexpected error for Kubernetes 1.29:\n{run.stderr.strip()}"


def test_helm_package_keeps_the_crd_and_leaves_ci_out(tmp_path):
    run = helm("package", inputs.CHART, "--destination", tmp_path)
    assert run.returncode == 0, f"helm package failed:\n{output_of(run)}"
    tarballs = sorted(tmp_path.glob("regmirror-*.tgz"))
    assert len(tarballs) == 1, f"helm package wrote {[p.name for p in tarballs]}, not one regmirror-*.tgz"
    with tarfile.open(tarballs[0]) as tar:
        names = tar.getnames()
    assert "regmirror/crds/regmirror.io_registrymirrors.yaml" in names, "packaged chart lacks its CRD"
    assert not [n for n in names if n.startswith("regmirror/ci/")], "packaged chart contains ci/ (see .helmignore)"


# ---------------------------------------------------------------- examples/gitops
def test_gitops_has_kustomizations():
    assert inputs.kustomizations(), "no kustomization under examples/gitops"


@pytest.mark.parametrize("directory", inputs.kustomizations(), ids=inputs.rel)
def test_kubectl_kustomize_builds(directory):
    try:
        inputs.output(inputs.kustomize_path(directory))
    except inputs.InputError as e:
        pytest.fail(f"kubectl kustomize {inputs.rel(directory)}: {e}", pytrace=False)

//! regmirror against a real Kubernetes API server: the control plane of `regmirror_testbed`
//! (etcd, kube-apiserver, kube-controller-manager and kubectl built from the official Go modules
//! by `testbed/kube/build`), one per test binary, shared by every test here.
//!
//! - [`crd`]: the CRD applied with kubectl; a table of valid and invalid RegistryMirrors, each
//!   accepted or refused by the API server with its rule's message, and the same table through
//!   `regmirror validate`;
//! - [`chart`]: `helm install`, `upgrade` and `uninstall` of charts/regmirror with every value set
//!   scripts/chart-checks renders, and `helm template | kubectl apply --dry-run=server`;
//! - [`release`]: the chart pushed with `helm push` to a loopback OCI registry and installed
//!   from `oci://…` with README's command;
//! - [`privilege`]: the chart's ServiceAccounts with TokenRequest tokens: a `kubectl auth can-i`
//!   matrix, real reads, and the chart's ValidatingAdmissionPolicy on the node updates an agent
//!   may and may not make (the only test of that policy: the API server evaluates it).
//!
//! The chart's objects have fixed names (one installation per cluster), so the tests that
//! install it take [`support::chart_lock`] and leave the cluster as they found it.

mod cache;
mod chart;
mod crd;
mod plan;
mod privilege;
mod release;
mod support;

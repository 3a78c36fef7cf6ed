//! The CRD for real: `kubectl apply --server-side -f crds/` is accepted (structural schema, CEL
//! cost within budget), a table of RegistryMirrors is accepted or refused by the API server as
//! each row says — every CEL rule and every schema bound of crds/ has a row that breaks it, the
//! refusal carrying its message — and `regmirror validate` says yes or no alike, except for the
//! rows that name why it may not.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use serde_json::{json, Value};

use crate::support::{self, crd_applied, kubectl, kubectl_ok, repo};

/// What the API server does with a row.
enum Api {
    Accepts,
    /// Refuses; each (field, message) must appear on one line of kubectl's error.
    Refuses(Vec<(&'static str, Message)>),
}

/// A message the API server gives.
#[derive(Clone, Copy)]
enum Message {
    /// The `message` of the CRD's one CEL rule whose message contains this text (resolved
    /// against crds/ when the table runs, so every rule's exact wording is checked and counted).
    Cel(&'static str),
    /// Text of one of the API server's own schema messages.
    Schema(&'static str),
}

/// Where `regmirror validate` (run as CI runs it: every flavor) departs from the API server.
enum Validate {
    /// Says yes or no as the API server does.
    Agrees,
    /// Refuses what the API server accepts, with this in its message, because of `why`.
    Refuses {
        says: &'static str,
        why: &'static str,
        /// Agrees with the API server when told the nodes are of this flavor only.
        agrees_for_flavor: Option<&'static str>,
    },
}

struct Row {
    name: &'static str,
    object: Value,
    api: Api,
    /// The schema bounds (`<path> <keyword>`, as [`schema_bounds`] lists them) this row breaks.
    breaks: Vec<String>,
    validate: Validate,
}

const MIRROR: &str = "https://mirror.internal.example.com:5000";

fn mirror(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "regmirror.io/v1alpha1",
        "kind": "RegistryMirror",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn endpoint_spec(endpoint: Value) -> Value {
    json!({"registry": "docker.io", "endpoints": [endpoint]})
}

fn url_spec(url: &str) -> Value {
    endpoint_spec(json!({ "url": url }))
}

fn with(mut spec: Value, key: &str, value: Value) -> Value {
    spec[key] = value;
    spec
}

fn minimal() -> Value {
    url_spec(MIRROR)
}

/// A host name of `len` characters: labels of at most 63 characters joined by dots.
fn host_of(len: usize) -> String {
    let mut host = String::new();
    loop {
        let rest = len - host.len();
        if rest <= 63 {
            host.push_str(&"a".repeat(rest));
            return host;
        }
        host.push_str(&"a".repeat(62.min(rest - 2)));
        host.push('.');
    }
}

fn accepts(name: &'static str, spec: Value) -> Row {
    Row {
        name,
        object: mirror(name, spec),
        api: Api::Accepts,
        breaks: Vec::new(),
        validate: Validate::Agrees,
    }
}

fn refuses(name: &'static str, spec: Value, field: &'static str, message: Message) -> Row {
    Row {
        name,
        object: mirror(name, spec),
        api: Api::Refuses(vec![(field, message)]),
        breaks: Vec::new(),
        validate: Validate::Agrees,
    }
}

impl Row {
    fn breaking(mut self, bound: &str) -> Row {
        self.breaks.push(bound.to_owned());
        self
    }

    fn validate_refuses(
        mut self,
        says: &'static str,
        why: &'static str,
        agrees_for_flavor: Option<&'static str>,
    ) -> Row {
        self.validate = Validate::Refuses {
            says,
            why,
            agrees_for_flavor,
        };
        self
    }
}

use Message::{Cel, Schema};

fn table() -> Vec<Row> {
    let tls = |tls: Value| endpoint_spec(json!({"url": MIRROR, "tls": tls}));
    let http_tls = |tls: Value| {
        endpoint_spec(json!({"url": "http://mirror.internal.example.com:5000", "tls": tls}))
    };
    let selector = |selector: Value| with(minimal(), "nodeSelector", selector);
    let rewrites = |rewrites: Value| with(minimal(), "rewrites", rewrites);
    let rewrite = |pattern: &str, replacement: &str| {
        rewrites(json!([{"pattern": pattern, "replacement": replacement}]))
    };
    let many_endpoints = |n: usize| {
        let endpoints: Vec<Value> = (0..n)
            .map(|i| json!({"url": format!("https://m{i}.example.com")}))
            .collect();
        json!({"registry": "docker.io", "endpoints": endpoints})
    };
    let many_rewrites = |n: usize| {
        let list: Vec<Value> = (0..n)
            .map(|i| json!({"pattern": format!("^team{i}/(.*)"), "replacement": ""}))
            .collect();
        rewrites(Value::Array(list))
    };
    let registry = |name: &str| with(minimal(), "registry", json!(name));
    let registry_form = Cel("must be a host name or IP address");
    let url_form = Cel("url must be [https://|http://]host[:port][/path]");
    let url_characters = Cel("url must not contain spaces");
    let url_traversal = Cel("url path must not contain '.' or '..' segments");
    let http_tls_message = Cel("TLS settings given for an http:// endpoint");
    let ca_ref_message = Cel("caRef needs exactly one");
    let flavors_differ =
        "the API server cannot know the nodes' flavors; validate, told none, checks \
        every flavor a node may have, and containerd and CRI-O nodes cannot express this";
    let any_of_selector = Schema("\"spec.nodeSelector\" must validate at least one schema (anyOf)");

    let mut no_spec = mirror("no-spec", Value::Null);
    no_spec.as_object_mut().unwrap().remove("spec");

    vec![
        // ---------------------------------------------------------------- accepted
        accepts("minimal", minimal()),
        accepts(
            "docker-hub-example",
            endpoint_spec(json!({
                "url": MIRROR,
                "auth": {"secretRef": {"name": "mirror-pull"}},
                "tls": {"caRef": {"configMapRef": {"name": "registry-ca"}}},
            })),
        ),
        accepts("every-registry", registry("*")).validate_refuses(
            "cri-o cannot express a mirror for every registry",
            flavors_differ,
            Some("k3s"),
        ),
        accepts(
            "registry-with-port-endpoint-with-path",
            with(
                url_spec("https://mirror.internal.example.com:5000/v2/example"),
                "registry",
                json!("registry.example.com:5000"),
            ),
        ),
        accepts(
            "ip-address-registries",
            json!({"registry": "[::1]:5000", "endpoints": [
                {"url": "https://[::1]:5001/v2"}, {"url": "http://127.0.0.1:5002"}]}),
        ),
        accepts(
            "http-endpoint-written-out",
            endpoint_spec(json!({"url": "http://mirror.internal.example.com:5000",
                "tls": {"insecureSkipVerify": false}})),
        ),
        accepts("endpoint-without-scheme", url_spec("mirror.internal.example.com:5000")),
        accepts("sixteen-endpoints", many_endpoints(16)),
        accepts(
            "longest-registry-and-url",
            json!({"registry": format!("{}:5000", host_of(255)),
                "endpoints": [{"url": format!("https://mirror.example.com/v2/{}", "p".repeat(2048 - 30))}]}),
        ),
        accepts(
            "endpoint-path-outside-v2",
            url_spec("https://mirror.internal.example.com:5000/proxy/docker"),
        )
        .validate_refuses(
            "cri-o cannot express an endpoint whose API root is not /v2 or under it",
            flavors_differ,
            Some("k3s"),
        ),
        accepts("empty-node-selector", selector(json!({}))),
        accepts(
            "node-selector-labels-and-expressions",
            selector(json!({
                "matchLabels": {"topology.kubernetes.io/region": "eu-west"},
                "matchExpressions": [
                    {"key": "a", "operator": "In", "values": ["x"]},
                    {"key": "b", "operator": "NotIn", "values": ["y", "z"]},
                    {"key": "c", "operator": "Exists"},
                    {"key": "d", "operator": "DoesNotExist"},
                ],
            })),
        ),
        accepts(
            "tls-from-secrets",
            tls(json!({
                "caRef": {"secretRef": {"name": "internal-ca", "key": "ca.crt"}},
                "clientCertSecretRef": {"name": "node-client-tls"},
                "insecureSkipVerify": false,
            })),
        ),
        accepts("insecure-skip-verify", tls(json!({"insecureSkipVerify": true}))),
        accepts(
            "rewrite",
            rewrite("^rancher/(.*)", "mirrorproject/rancher-images/$1"),
        )
        .validate_refuses(
            "containerd cannot express image rewrites",
            flavors_differ,
            Some("k3s"),
        ),
        accepts("thirty-two-rewrites", many_rewrites(32)).validate_refuses(
            "cri-o cannot express image rewrites",
            flavors_differ,
            Some("rke2"),
        ),
        accepts(
            "longest-rewrite",
            rewrite(&format!("^{}", "a".repeat(1023)), &"b".repeat(1024)),
        )
        .validate_refuses(
            "containerd cannot express image rewrites",
            flavors_differ,
            Some("k3s"),
        ),
        // Accepted by the API server, refused by validate: what only the operator can check.
        accepts("rewrite-that-does-not-compile", rewrite("^rancher/(", "x/$1")).validate_refuses(
            "does not compile",
            "CEL cannot compile an RE2 expression to check it; the operator (and validate) can",
            None,
        ),
        accepts(
            "credentials-from-a-missing-secret",
            endpoint_spec(json!({"url": MIRROR, "auth": {"secretRef": {"name": "absent"}}})),
        )
        .validate_refuses(
            "absent",
            "the API server does not look up referenced Secrets; validate reads them from its inputs",
            None,
        ),
        accepts(
            "credentials-to-a-host-the-secret-does-not-allow",
            endpoint_spec(json!({"url": "https://other.example.com",
                "auth": {"secretRef": {"name": "mirror-pull"}}})),
        )
        .validate_refuses(
            "does not allow its credentials to be sent to https://other.example.com",
            "the Secret's regmirror.io/allowed-hosts annotation is not visible to the CRD's rules",
            None,
        ),
        accepts(
            "credentials-over-plain-http",
            endpoint_spec(json!({"url": "http://mirror.internal.example.com:5000",
                "auth": {"secretRef": {"name": "mirror-pull"}}})),
        )
        .validate_refuses(
            "does not allow its credentials to be sent to http://mirror.internal.example.com:5000",
            "plain http needs the Secret to list the http:// URL, which only a reader of the Secret can check",
            None,
        ),
        accepts(
            "reference-outside-the-allowed-namespaces",
            endpoint_spec(json!({"url": MIRROR,
                "auth": {"secretRef": {"name": "mirror-pull", "namespace": "team-x"}}})),
        )
        .validate_refuses(
            "is in a namespace regmirror may not read",
            "the allow-list is the operator's configuration, unknown to the API server",
            None,
        ),
        accepts(
            "ca-from-a-missing-key",
            tls(json!({"caRef": {"configMapRef": {"name": "registry-ca", "key": "missing.crt"}}})),
        )
        .validate_refuses(
            "has no key \"missing.crt\"",
            "the API server does not look into referenced ConfigMaps",
            None,
        ),
        // ---------------------------------------------------------------- the object
        Row {
            name: "no-spec",
            object: no_spec,
            api: Api::Refuses(vec![("spec", Schema("Required value"))]),
            breaks: vec![" required spec".into()],
            validate: Validate::Agrees,
        },
        refuses(
            "unknown-spec-field",
            with(minimal(), "endpoint", json!([])),
            "spec.endpoint",
            Schema("unknown field \"spec.endpoint\""),
        ),
        refuses(
            "tls-field-outside-tls",
            endpoint_spec(json!({"url": MIRROR, "caRef": {"configMapRef": {"name": "registry-ca"}}})),
            "spec.endpoints[0].caRef",
            Schema("unknown field \"spec.endpoints[0].caRef\""),
        ),
        // ---------------------------------------------------------------- registry
        refuses(
            "no-registry",
            json!({"endpoints": [{"url": MIRROR}]}),
            "spec.registry",
            Schema("Required value"),
        )
        .breaking("spec required registry"),
        refuses(
            "empty-registry",
            registry(""),
            "spec.registry",
            Schema("should be at least 1 chars long"),
        )
        .breaking("spec.registry minLength"),
        refuses(
            "registry-too-long",
            registry(&format!("{}:5000", host_of(256))),
            "spec.registry",
            Schema("Too long: may not be more than 260 bytes"),
        )
        .breaking("spec.registry maxLength"),
        refuses("registry-with-a-path", registry("docker.io/library"), "spec.registry", registry_form),
        refuses("registry-with-a-scheme", registry("https://docker.io"), "spec.registry", registry_form),
        refuses("registry-port-out-of-range", registry("registry.example.com:65536"), "spec.registry", registry_form),
        refuses("registry-control-character", registry("docker.io\n"), "spec.registry", registry_form),
        refuses(
            "registry-upper-case",
            registry("Docker.io"),
            "spec.registry",
            Cel("must be lower case"),
        ),
        refuses(
            "registry-index-docker-io",
            registry("index.docker.io"),
            "spec.registry",
            Cel("write docker.io"),
        ),
        refuses(
            "registry-registry-1-docker-io",
            registry("registry-1.docker.io:443"),
            "spec.registry",
            Cel("write docker.io"),
        ),
        // ---------------------------------------------------------------- endpoints
        refuses(
            "no-endpoints",
            json!({"registry": "docker.io"}),
            "spec",
            Cel("endpoints must list at least one endpoint"),
        ),
        refuses(
            "empty-endpoints",
            json!({"registry": "docker.io", "endpoints": []}),
            "spec",
            Cel("endpoints must list at least one endpoint"),
        ),
        refuses(
            "empty-endpoints-embedded-registry-off",
            json!({"registry": "docker.io", "endpoints": [], "embeddedRegistry": false}),
            "spec",
            Cel("endpoints must list at least one endpoint"),
        ),
        accepts(
            "embedded-registry-alone",
            json!({"registry": "docker.io", "embeddedRegistry": true}),
        )
        .validate_refuses(
            "cannot express k3s's embedded registry mirror",
            flavors_differ,
            Some("k3s"),
        ),
        accepts(
            "embedded-registry-with-endpoints",
            with(minimal(), "embeddedRegistry", json!(true)),
        )
        .validate_refuses(
            "cannot express k3s's embedded registry mirror",
            flavors_differ,
            Some("k3s"),
        ),
        refuses(
            "embedded-registry-not-a-boolean",
            json!({"registry": "docker.io", "embeddedRegistry": "yes"}),
            "spec.embeddedRegistry",
            Schema("must be of type boolean"),
        ),
        refuses(
            "seventeen-endpoints",
            many_endpoints(17),
            "spec.endpoints",
            Schema("Too many: 17: must have at most 16 items"),
        )
        .breaking("spec.endpoints maxItems"),
        refuses(
            "endpoint-without-url",
            endpoint_spec(json!({"tls": {"insecureSkipVerify": true}})),
            "spec.endpoints[0].url",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[] required url"),
        refuses(
            "empty-url",
            url_spec(""),
            "spec.endpoints[0].url",
            Schema("should be at least 1 chars long"),
        )
        .breaking("spec.endpoints[].url minLength"),
        refuses(
            "url-too-long",
            url_spec(&format!("https://mirror.example.com/{}", "p".repeat(2048 - 26))),
            "spec.endpoints[0].url",
            Schema("Too long: may not be more than 2048 bytes"),
        )
        .breaking("spec.endpoints[].url maxLength"),
        refuses(
            "url-ftp-scheme",
            url_spec("ftp://mirror.example.com"),
            "spec.endpoints[0].url",
            Cel("url scheme must be https:// or http://"),
        ),
        refuses("url-with-a-space", url_spec("https://mirror.example.com/a b"), "spec.endpoints[0].url", url_characters),
        refuses("url-with-a-tab", url_spec("https://mirror.example.com\t"), "spec.endpoints[0].url", url_characters),
        refuses("url-with-a-c1-control", url_spec("https://mirror.example.com/\u{85}"), "spec.endpoints[0].url", url_characters),
        refuses("url-with-a-backslash", url_spec("https://mirror.example.com\\v2"), "spec.endpoints[0].url", url_characters),
        refuses("url-with-user-info", url_spec("https://user:pw@mirror.example.com"), "spec.endpoints[0].url", url_form),
        refuses("url-with-a-query", url_spec("https://mirror.example.com/v2?x=1"), "spec.endpoints[0].url", url_form),
        refuses("url-port-zero", url_spec("https://mirror.example.com:0"), "spec.endpoints[0].url", url_form),
        refuses("url-dot-dot-segment", url_spec("https://mirror.example.com/v2/../x"), "spec.endpoints[0].url", url_traversal),
        refuses("url-percent-encoded-dots", url_spec("https://mirror.example.com/v2/%2e%2e/x"), "spec.endpoints[0].url", url_traversal),
        refuses(
            "http-with-a-ca",
            http_tls(json!({"caRef": {"configMapRef": {"name": "registry-ca"}}})),
            "spec.endpoints[0]",
            http_tls_message,
        ),
        refuses(
            "http-with-insecure-skip-verify",
            http_tls(json!({"insecureSkipVerify": true})),
            "spec.endpoints[0]",
            http_tls_message,
        ),
        refuses(
            "http-with-a-client-certificate",
            http_tls(json!({"clientCertSecretRef": {"name": "node-client-tls"}})),
            "spec.endpoints[0]",
            http_tls_message,
        ),
        refuses(
            "ca-ref-with-both",
            tls(json!({"caRef": {"secretRef": {"name": "internal-ca"},
                "configMapRef": {"name": "registry-ca"}}})),
            "spec.endpoints[0].tls.caRef",
            ca_ref_message,
        ),
        refuses(
            "ca-ref-with-neither",
            tls(json!({"caRef": {}})),
            "spec.endpoints[0].tls.caRef",
            ca_ref_message,
        ),
        refuses(
            "ca-secret-ref-without-name",
            tls(json!({"caRef": {"secretRef": {"key": "ca.crt"}}})),
            "spec.endpoints[0].tls.caRef.secretRef.name",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[].tls.caRef.secretRef required name"),
        refuses(
            "ca-config-map-ref-without-name",
            tls(json!({"caRef": {"configMapRef": {"key": "ca.crt"}}})),
            "spec.endpoints[0].tls.caRef.configMapRef.name",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[].tls.caRef.configMapRef required name"),
        refuses(
            "client-certificate-without-name",
            tls(json!({"clientCertSecretRef": {}})),
            "spec.endpoints[0].tls.clientCertSecretRef.name",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[].tls.clientCertSecretRef required name"),
        refuses(
            "insecure-skip-verify-not-a-boolean",
            tls(json!({"insecureSkipVerify": "yes"})),
            "spec.endpoints[0].tls.insecureSkipVerify",
            Schema("must be of type boolean"),
        ),
        refuses(
            "auth-without-secret-ref",
            endpoint_spec(json!({"url": MIRROR, "auth": {}})),
            "spec.endpoints[0].auth.secretRef",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[].auth required secretRef"),
        refuses(
            "auth-secret-ref-without-name",
            endpoint_spec(json!({"url": MIRROR, "auth": {"secretRef": {"namespace": "regmirror-system"}}})),
            "spec.endpoints[0].auth.secretRef.name",
            Schema("Required value"),
        )
        .breaking("spec.endpoints[].auth.secretRef required name"),
        // ---------------------------------------------------------------- nodeSelector
        refuses(
            "node-selector-match-label",
            selector(json!({"matchLabel": {"kubernetes.io/os": "linux"}})),
            "spec.nodeSelector",
            any_of_selector,
        )
        .breaking("spec.nodeSelector anyOf"),
        refuses(
            "node-selector-pod-style-map",
            selector(json!({"kubernetes.io/os": "linux"})),
            "spec.nodeSelector",
            Schema("\"spec.nodeSelector\" must validate at least one schema (anyOf)"),
        ),
        refuses(
            "node-selector-match-fields",
            selector(json!({"matchLabels": {"a": "b"},
                "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]})),
            "spec.nodeSelector",
            Schema("\"spec.nodeSelector\" must validate at least one schema (anyOf)"),
        ),
        refuses(
            "match-labels-not-strings",
            selector(json!({"matchLabels": {"a": 1}})),
            "spec.nodeSelector.matchLabels.a",
            Schema("must be of type string"),
        ),
        refuses(
            "expression-misspelled-values",
            selector(json!({"matchExpressions": [{"key": "a", "operator": "In", "value": ["b"]}]})),
            "spec.nodeSelector.matchExpressions[0]",
            Schema("\"spec.nodeSelector.matchExpressions[0]\" must validate at least one schema (anyOf)"),
        )
        .breaking("spec.nodeSelector.matchExpressions[] anyOf"),
        refuses(
            "expression-unknown-operator",
            selector(json!({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]})),
            "spec.nodeSelector.matchExpressions[0].operator",
            Schema("Unsupported value: \"Equals\""),
        )
        .breaking("spec.nodeSelector.matchExpressions[].operator enum"),
        refuses(
            "expression-in-without-values",
            selector(json!({"matchExpressions": [{"key": "a", "operator": "In"}]})),
            "spec.nodeSelector.matchExpressions[0]",
            Cel("operators In and NotIn need values"),
        ),
        refuses(
            "expression-exists-with-values",
            selector(json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]})),
            "spec.nodeSelector.matchExpressions[0]",
            Cel("operators In and NotIn need values"),
        ),
        refuses(
            "expression-without-key",
            selector(json!({"matchExpressions": [{"operator": "Exists"}]})),
            "spec.nodeSelector.matchExpressions[0].key",
            Schema("Required value"),
        )
        .breaking("spec.nodeSelector.matchExpressions[] required key"),
        refuses(
            "expression-without-operator",
            selector(json!({"matchExpressions": [{"key": "a"}]})),
            "spec.nodeSelector.matchExpressions[0].operator",
            Schema("Required value"),
        )
        .breaking("spec.nodeSelector.matchExpressions[] required operator"),
        // ---------------------------------------------------------------- rewrites
        refuses(
            "thirty-three-rewrites",
            many_rewrites(33),
            "spec.rewrites",
            Schema("Too many: 33: must have at most 32 items"),
        )
        .breaking("spec.rewrites maxItems"),
        refuses(
            "rewrite-without-pattern",
            rewrites(json!([{"replacement": "x"}])),
            "spec.rewrites[0].pattern",
            Schema("Required value"),
        )
        .breaking("spec.rewrites[] required pattern"),
        refuses(
            "rewrite-without-replacement",
            rewrites(json!([{"pattern": "^x"}])),
            "spec.rewrites[0].replacement",
            Schema("Required value"),
        )
        .breaking("spec.rewrites[] required replacement"),
        refuses(
            "empty-pattern",
            rewrite("", "x"),
            "spec.rewrites[0].pattern",
            Schema("should be at least 1 chars long"),
        )
        .breaking("spec.rewrites[].pattern minLength"),
        refuses(
            "pattern-too-long",
            rewrite(&"a".repeat(1025), "x"),
            "spec.rewrites[0].pattern",
            Schema("Too long: may not be more than 1024 bytes"),
        )
        .breaking("spec.rewrites[].pattern maxLength"),
        refuses(
            "replacement-too-long",
            rewrite("^x", &"b".repeat(1025)),
            "spec.rewrites[0].replacement",
            Schema("Too long: may not be more than 1024 bytes"),
        )
        .breaking("spec.rewrites[].replacement maxLength"),
        refuses(
            "pattern-with-a-newline",
            rewrite("^rancher/(.*)\n", "x/$1"),
            "spec.rewrites[0].pattern",
            Cel("pattern must not contain control characters"),
        ),
        refuses(
            "pattern-with-a-backslash",
            rewrite("^rancher\\.io/(.*)", "x/$1"),
            "spec.rewrites[0].pattern",
            Cel("pattern must not contain a backslash or a double quote"),
        ),
        refuses(
            "pattern-with-a-double-quote",
            rewrite("^\"x", "y"),
            "spec.rewrites[0].pattern",
            Cel("pattern must not contain a backslash or a double quote"),
        ),
        refuses(
            "replacement-with-a-control-character",
            rewrite("^x/(.*)", "y/$1\u{7f}"),
            "spec.rewrites[0].replacement",
            Cel("replacement must not contain control characters"),
        ),
        refuses(
            "replacement-with-a-double-quote",
            rewrite("^x/(.*)", "y/\"$1"),
            "spec.rewrites[0].replacement",
            Cel("replacement must not contain a backslash or a double quote"),
        ),
        // ---------------------------------------------------------------- pull-through cache
        accepts("cache-with-defaults", cache(json!({}))),
        accepts(
            "cache-in-an-empty-dir",
            cache(json!({"storage": {"emptyDir": {"sizeLimit": "20Gi"}}})),
        ),
        accepts(
            "cache-on-a-claim",
            cache(json!({"storage": {"persistentVolumeClaim": {"claimName": "docker-hub-cache"}}})),
        ),
        accepts(
            "cache-of-an-upstream-with-a-path",
            with(
                url_spec("https://mirror.internal.example.com:5000/v2/hub"),
                "cache",
                json!({}),
            ),
        )
        .validate_refuses(
            "the cache's upstream https://mirror.internal.example.com:5000/v2/hub has a path",
            "the schema cannot tell a path the cache can proxy from one it cannot; resolve can",
            None,
        ),
        refuses(
            "cache-without-an-endpoint",
            json!({"registry": "docker.io", "embeddedRegistry": true, "cache": {}}),
            "spec",
            Cel("cache needs an endpoint to proxy"),
        ),
        refuses(
            "cache-for-every-registry",
            with(
                with(minimal(), "registry", json!("*")),
                "cache",
                json!({}),
            ),
            "spec",
            Cel("cache is not for registry '*'"),
        ),
        refuses(
            "cache-on-two-storages",
            cache(json!({"storage": {"emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}})),
            "spec.cache.storage",
            Cel("storage needs exactly one of emptyDir or persistentVolumeClaim"),
        ),
        refuses(
            "cache-on-no-storage",
            cache(json!({"storage": {}})),
            "spec.cache.storage",
            Cel("storage needs exactly one of emptyDir or persistentVolumeClaim"),
        ),
        refuses(
            "cache-size-not-a-quantity",
            cache(json!({"storage": {"emptyDir": {"sizeLimit": "20 GB"}}})),
            "spec.cache.storage.emptyDir.sizeLimit",
            Cel("sizeLimit must be a quantity"),
        ),
        refuses(
            "cache-size-empty",
            cache(json!({"storage": {"emptyDir": {"sizeLimit": ""}}})),
            "spec.cache.storage.emptyDir.sizeLimit",
            Schema("should be at least 1 chars long"),
        )
        .breaking("spec.cache.storage.emptyDir.sizeLimit minLength"),
        refuses(
            "cache-size-too-long",
            cache(json!({"storage": {"emptyDir": {"sizeLimit": "9".repeat(65)}}})),
            "spec.cache.storage.emptyDir.sizeLimit",
            Schema("Too long: may not be more than 64 bytes"),
        )
        .breaking("spec.cache.storage.emptyDir.sizeLimit maxLength"),
        refuses(
            "cache-claim-without-a-name",
            cache(json!({"storage": {"persistentVolumeClaim": {}}})),
            "spec.cache.storage.persistentVolumeClaim.claimName",
            Schema("Required value"),
        )
        .breaking("spec.cache.storage.persistentVolumeClaim required claimName"),
        refuses(
            "cache-claim-name-empty",
            cache(json!({"storage": {"persistentVolumeClaim": {"claimName": ""}}})),
            "spec.cache.storage.persistentVolumeClaim.claimName",
            Schema("should be at least 1 chars long"),
        )
        .breaking("spec.cache.storage.persistentVolumeClaim.claimName minLength"),
        refuses(
            "cache-claim-name-too-long",
            cache(json!({"storage": {"persistentVolumeClaim": {"claimName": "c".repeat(254)}}})),
            "spec.cache.storage.persistentVolumeClaim.claimName",
            Schema("Too long: may not be more than 253 bytes"),
        )
        .breaking("spec.cache.storage.persistentVolumeClaim.claimName maxLength"),
        refuses(
            "cache-claim-name-upper-case",
            cache(json!({"storage": {"persistentVolumeClaim": {"claimName": "Cache"}}})),
            "spec.cache.storage.persistentVolumeClaim.claimName",
            Cel("claimName must be a PersistentVolumeClaim name"),
        ),
    ]
}

/// The minimal mirror with `cache`.
fn cache(cache: Value) -> Value {
    with(minimal(), "cache", cache)
}

/// The CRD of crds/ as JSON.
fn crd() -> Value {
    let text =
        std::fs::read_to_string(repo().join("crds/regmirror.io_registrymirrors.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn spec_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
}

/// Every CEL rule's message in the schema (status included: none there today).
fn cel_messages(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                for rule in rules {
                    out.push(
                        rule["message"]
                            .as_str()
                            .expect("every rule has a message")
                            .to_owned(),
                    );
                }
            }
            map.values().for_each(|v| cel_messages(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| cel_messages(v, out)),
        _ => {}
    }
}

/// The bounds of the schema a user's spec can break, as `<path> <keyword>` (`<path> required
/// <field>` for each required field): lengths, item counts, enums, `anyOf`, required fields.
/// The status (written by the operator only) is left out.
fn schema_bounds(schema: &Value, path: &str, out: &mut BTreeSet<String>) {
    let Value::Object(map) = schema else { return };
    for keyword in [
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "enum",
        "anyOf",
    ] {
        if map.contains_key(keyword) {
            out.insert(format!("{path} {keyword}"));
        }
    }
    if let Some(Value::Array(required)) = map.get("required") {
        for field in required {
            out.insert(format!("{path} required {}", field.as_str().unwrap()));
        }
    }
    if let Some(Value::Object(properties)) = map.get("properties") {
        for (name, property) in properties {
            if path.is_empty() && name == "status" {
                continue;
            }
            let child = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            schema_bounds(property, &child, out);
        }
    }
    if let Some(items) = map.get("items") {
        schema_bounds(items, &format!("{path}[]"), out);
    }
}

/// The JSON of an object, with the C1 control characters escaped (a raw U+0085 would be a line
/// break to a YAML reader; `validate` reads the same file as YAML).
fn json_text(object: &Value) -> String {
    let mut text = String::new();
    for c in serde_json::to_string_pretty(object).unwrap().chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            text.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            text.push(c);
        }
    }
    text
}

/// The Secrets and ConfigMaps the rows reference, for `regmirror validate` (the API server
/// needs none of them): examples/registry-credentials.yaml (Secret mirror-pull for
/// mirror.internal.example.com:5000, ConfigMap registry-ca) and a CA Secret and a client
/// certificate Secret made here.
fn references(dir: &std::path::Path) -> String {
    let examples =
        std::fs::read_to_string(repo().join("examples/registry-credentials.yaml")).unwrap();
    let ca = support::yaml_documents(&examples)
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap()["data"]["ca.crt"]
        .as_str()
        .unwrap()
        .to_owned();
    let pki = regmirror_testbed::Pki::create(&dir.join("pki"));
    let secrets = [
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "internal-ca", "namespace": "regmirror-system"},
            "type": "Opaque", "stringData": {"ca.crt": ca}}),
        json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "node-client-tls", "namespace": "regmirror-system",
                "annotations": {"regmirror.io/allowed-hosts": "mirror.internal.example.com:5000"}},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": pki.pem("client.crt"), "tls.key": pki.pem("client.key")}}),
    ];
    let mut text = examples;
    for secret in secrets {
        text.push_str("\n---\n");
        text.push_str(&serde_json::to_string(&secret).unwrap());
        text.push('\n');
    }
    text
}

/// `regmirror validate` on the row's file and the references: (accepted, output).
fn validate(dir: &std::path::Path, flavor: Option<&str>) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_regmirror"));
    command.arg("validate").arg(dir);
    if let Some(flavor) = flavor {
        command.args(["--flavor", flavor]);
    }
    let out = support::run(&mut command, None);
    let code = if out.ok { 0 } else { 1 };
    assert!(
        out.ok || out.stderr.contains("problem(s) found"),
        "regmirror validate failed to run ({code}):\n{}",
        out.text()
    );
    (out.ok, out.text())
}

#[test]
fn crd_applies_server_side_and_is_served_with_its_rules() {
    let applied = crd_applied();
    assert!(
        applied.contains("customresourcedefinition.apiextensions.k8s.io/registrymirrors.regmirror.io serverside-applied"),
        "{applied}"
    );
    // What the API server holds is the file's schema, every rule of it.
    let stored = support::get_json(&["crd", "registrymirrors.regmirror.io"]).unwrap();
    let file = crd();
    // (YAML's `0.0` comes back as JSON's `0`: numbers compare by value.)
    for (a, b, what) in [
        (
            spec_schema(&stored),
            spec_schema(&file),
            "crds/ has what the API server lacks",
        ),
        (
            spec_schema(&file),
            spec_schema(&stored),
            "the API server has what crds/ lacks",
        ),
    ] {
        if let Err(difference) = support::contains(a, b, "openAPIV3Schema") {
            panic!("the stored schema differs from crds/: {what}: {difference}");
        }
    }
    let conditions = stored["status"]["conditions"].as_array().unwrap();
    for condition in ["NamesAccepted", "Established"] {
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == condition && c["status"] == "True"),
            "{condition}: {conditions:?}"
        );
    }
    assert!(
        !conditions
            .iter()
            .any(|c| c["type"] == "NonStructuralSchema" && c["status"] == "True"),
        "{conditions:?}"
    );
    // A second apply changes nothing.
    let again = kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        repo().join("crds").to_str().unwrap(),
    ]);
    assert!(again.contains("serverside-applied"), "{again}");
    let after = support::get_json(&["crd", "registrymirrors.regmirror.io"]).unwrap();
    assert_eq!(
        after["metadata"]["generation"], stored["metadata"]["generation"],
        "reapplying the same CRD changed it"
    );
}

#[test]
fn printer_columns_show_in_kubectl_get() {
    // Its mirror's status must not be an operator's (cache.rs runs one while it holds this).
    let _lock = support::chart_lock();
    crd_applied();
    let object = mirror("columns", url_spec(MIRROR));
    let out = support::kubectl_stdin(&["apply", "-f", "-"], &json_text(&object));
    assert!(out.ok, "{}", out.text());
    // The status as the operator writes it (status subresource).
    let status = json!({"status": {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Applied", "message": ""}],
        "nodes": {"targeted": 3, "updated": 2, "pending": 0, "failed": 1},
    }});
    kubectl_ok(&[
        "patch",
        "registrymirror",
        "columns",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let table = kubectl_ok(&["get", "registrymirrors", "columns"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let file = crd();
    let mut expected: Vec<String> = vec!["NAME".into()];
    for column in file["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
    {
        expected.push(column["name"].as_str().unwrap().to_uppercase());
    }
    assert_eq!(lines[0], expected, "{table}");
    assert_eq!(
        lines[1][..6],
        ["columns", "docker.io", "True", "3", "2", "1"],
        "{table}"
    );
    // The short name and the category list it too.
    for resource in ["rmir", "regmirror"] {
        let listed = kubectl_ok(&["get", resource, "columns", "-o", "name"]);
        assert_eq!(listed.trim(), "registrymirror.regmirror.io/columns");
    }
    kubectl_ok(&["delete", "registrymirror", "columns"]);
}

#[test]
fn kubectl_explain_describes_the_fields() {
    crd_applied();
    let explained = support::eventually(
        "kubectl explain registrymirror.spec.endpoints",
        std::time::Duration::from_secs(60),
        || {
            // The OpenAPI document is published a moment after the CRD is Established.
            let out = kubectl(&["explain", "registrymirror.spec.endpoints"]);
            if out.ok && out.stdout.contains("FIELDS:") {
                Ok(out.stdout)
            } else {
                Err(out.text())
            }
        },
    );
    let file = crd();
    let endpoints = &spec_schema(&file)["properties"]["spec"]["properties"]["endpoints"];
    assert!(
        explained.contains("GROUP:      regmirror.io"),
        "{explained}"
    );
    assert!(
        explained.contains("KIND:       RegistryMirror"),
        "{explained}"
    );
    assert!(
        explained.contains("FIELD: endpoints <[]Object>"),
        "{explained}"
    );
    // kubectl wraps the description: compare the words.
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words(&explained).contains(&words(endpoints["description"].as_str().unwrap())),
        "{explained}"
    );
    for field in endpoints["items"]["properties"].as_object().unwrap().keys() {
        assert!(
            explained
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{field}\t"))),
            "field {field} missing:\n{explained}"
        );
    }
    assert!(
        explained.contains("url\t<string> -required-"),
        "{explained}"
    );
}

#[test]
fn the_api_server_and_validate_judge_the_table_alike() {
    // Its mirrors must not meet an operator (cache.rs runs one while it holds this).
    let _lock = support::chart_lock();
    crd_applied();
    let file = crd();
    let schema = spec_schema(&file);
    let mut rule_messages = Vec::new();
    cel_messages(schema, &mut rule_messages);
    let mut bounds = BTreeSet::new();
    schema_bounds(schema, "", &mut bounds);
    let rows = table();
    let names: BTreeSet<&str> = rows.iter().map(|r| r.name).collect();
    assert_eq!(names.len(), rows.len(), "two rows share a name");

    let work = tempfile::tempdir().unwrap();
    let references = references(work.path());
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut used_rules = BTreeSet::new();
    let mut broken = BTreeSet::new();
    let mut differences = Vec::new();
    for row in &rows {
        let text = json_text(&row.object);
        let dir = work.path().join(row.name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("registrymirror.yaml");
        std::fs::write(&file, &text).unwrap();
        std::fs::write(dir.join("references.yaml"), &references).unwrap();

        // The real kubectl, as a person applies a file.
        let out = kubectl(&["apply", "-f", file.to_str().unwrap()]);
        let stored = support::get_json(&["registrymirror", row.name]);
        let api_accepted = out.ok;
        match &row.api {
            Api::Accepts => {
                if !out.ok {
                    failures.push(format!(
                        "{}: refused, must be accepted:\n{}",
                        row.name,
                        out.text()
                    ));
                } else if stored.as_ref().map(|s| &s["spec"]) != Some(&row.object["spec"]) {
                    failures.push(format!(
                        "{}: the API server holds {:?}, sent {}",
                        row.name,
                        stored.map(|s| s["spec"].clone()),
                        row.object["spec"]
                    ));
                }
            }
            Api::Refuses(expected) => {
                if out.ok || stored.is_some() {
                    failures.push(format!(
                        "{}: accepted, must be refused:\n{}",
                        row.name,
                        out.text()
                    ));
                }
                for (field, message) in expected {
                    let message = match message {
                        Message::Schema(text) => text.to_string(),
                        Message::Cel(part) => {
                            let matching: Vec<&String> =
                                rule_messages.iter().filter(|m| m.contains(part)).collect();
                            assert_eq!(
                                matching.len(),
                                1,
                                "{}: {part:?} must name exactly one rule of crds/, names {matching:?}",
                                row.name
                            );
                            used_rules.insert(matching[0].clone());
                            matching[0].clone()
                        }
                    };
                    let text = out.text();
                    if !text
                        .lines()
                        .any(|l| l.contains(field) && l.contains(&message))
                    {
                        failures.push(format!(
                            "{}: no line of the refusal names {field} with {message:?}:\n{text}",
                            row.name
                        ));
                    }
                }
                broken.extend(row.breaks.iter().cloned());
            }
        }

        // regmirror validate, as CI on a GitOps repository runs it.
        let (validate_accepted, said) = validate(&dir, None);
        match &row.validate {
            Validate::Agrees => {
                if validate_accepted != api_accepted {
                    failures.push(format!(
                        "{}: the API server {} it, validate {} it:\n{said}",
                        row.name,
                        verdict(api_accepted),
                        verdict(validate_accepted)
                    ));
                }
            }
            Validate::Refuses {
                says,
                why,
                agrees_for_flavor,
            } => {
                assert!(
                    matches!(row.api, Api::Accepts),
                    "{}: a difference row must be accepted by the API server",
                    row.name
                );
                if validate_accepted || !said.contains(says) {
                    failures.push(format!(
                        "{}: validate must refuse it saying {says:?}, said:\n{said}",
                        row.name
                    ));
                }
                if let Some(flavor) = agrees_for_flavor {
                    let (accepted, said) = validate(&dir, Some(flavor));
                    if !accepted {
                        failures.push(format!(
                            "{}: validate --flavor {flavor} must accept it:\n{said}",
                            row.name
                        ));
                    }
                }
                differences.push(format!("{}: {why}", row.name));
            }
        }
        if api_accepted {
            kubectl_ok(&["delete", "registrymirror", row.name]);
        }
    }
    eprintln!(
        "{} rows through kubectl and regmirror validate in {:.1} s; where validate refuses what \
         the API server accepts:\n  {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        differences.join("\n  ")
    );

    let unused: Vec<&String> = rule_messages
        .iter()
        .filter(|m| !used_rules.contains(*m))
        .collect();
    let unbroken: Vec<&String> = bounds.difference(&broken).collect();
    let unknown: Vec<&String> = broken.difference(&bounds).collect();
    assert!(
        failures.is_empty() && unused.is_empty() && unbroken.is_empty() && unknown.is_empty(),
        "{}\nCEL rules of crds/ no row breaks: {unused:#?}\nschema bounds no row breaks: \
         {unbroken:#?}\nrows claim bounds crds/ does not have: {unknown:#?}",
        failures.join("\n\n")
    );
}

fn verdict(accepted: bool) -> &'static str {
    if accepted {
        "accepts"
    } else {
        "refuses"
    }
}

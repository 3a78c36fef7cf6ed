//! A snapshot of the Secrets and ConfigMaps RegistryMirrors may reference, as plain data.
//!
//! The operator fills it from its watch caches; the CLI fills it from YAML files. Resolving
//! references against it is a pure lookup.

use std::collections::BTreeMap;

/// The kind of a referenced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    Secret,
    ConfigMap,
}

impl SourceKind {
    /// The Kubernetes kind, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Secret => "Secret",
            SourceKind::ConfigMap => "ConfigMap",
        }
    }
}

/// One Secret or ConfigMap: its type (Secrets only) and its decoded data.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SourceObject {
    /// `type` of a Secret (`Opaque` when unset); `None` for ConfigMaps.
    pub type_: Option<String>,
    /// Decoded data (`data` and `stringData` of a Secret; `data` of a ConfigMap).
    pub data: BTreeMap<String, Vec<u8>>,
}

// Secret values never reach a log line: Debug shows keys only.
impl std::fmt::Debug for SourceObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceObject")
            .field("type_", &self.type_)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Address of a source object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceKey {
    pub kind: SourceKind,
    pub namespace: String,
    pub name: String,
}

/// All the objects references may resolve to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    objects: BTreeMap<SourceKey, SourceObject>,
}

impl Sources {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one object.
    pub fn insert(&mut self, kind: SourceKind, namespace: &str, name: &str, object: SourceObject) {
        let key = SourceKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.objects.insert(key, object);
    }

    /// Looks one object up.
    pub fn get(&self, kind: SourceKind, namespace: &str, name: &str) -> Option<&SourceObject> {
        let key = SourceKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.objects.get(&key)
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&SourceKey, &SourceObject)> {
        self.objects.iter()
    }
}

/// Which namespaces references may point into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPolicy {
    /// The operator's own namespace: the default for references without one.
    pub operator_namespace: String,
    /// Further namespaces an administrator allowed explicitly.
    pub allowed_namespaces: Vec<String>,
}

impl RefPolicy {
    /// A policy that allows only the operator's namespace.
    pub fn new(operator_namespace: impl Into<String>) -> Self {
        Self {
            operator_namespace: operator_namespace.into(),
            allowed_namespaces: Vec::new(),
        }
    }

    /// Whether objects in `namespace` may be referenced.
    pub fn allows(&self, namespace: &str) -> bool {
        namespace == self.operator_namespace
            || self.allowed_namespaces.iter().any(|n| n == namespace)
    }

    /// The allowed namespaces, for messages.
    pub fn describe(&self) -> String {
        let mut all = vec![self.operator_namespace.clone()];
        all.extend(self.allowed_namespaces.iter().cloned());
        all.join(", ")
    }
}

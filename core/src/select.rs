//! Node selection: does a RegistryMirror's `nodeSelector` select a node with these labels?
//! Kubernetes label-selector semantics: all `matchLabels` and all `matchExpressions` must hold.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `selector` (absent or empty: every node) selects a node with `labels`.
/// Call [`check`] first: an invalid operator selects nothing.
pub fn matches(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_hold = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_hold = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_hold && expressions_hold
}

/// Checks that every expression can be evaluated, as the API server would for a Deployment.
pub fn check(selector: &LabelSelector) -> Result<(), String> {
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        match e.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(format!(
                    "matchExpressions[{i}]: operator {} needs values",
                    e.operator
                ));
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(format!(
                    "matchExpressions[{i}]: operator {} takes no values",
                    e.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => return Err(format!("matchExpressions[{i}]: unknown operator {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn absent_and_empty_selectors_select_every_node() {
        assert!(matches(None, &labels(&[])));
        assert!(matches(
            Some(&LabelSelector::default()),
            &labels(&[("a", "b")])
        ));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("region", "eu"), ("tier", "edge")])),
            ..Default::default()
        };
        assert!(matches(
            Some(&s),
            &labels(&[("region", "eu"), ("tier", "edge"), ("x", "y")])
        ));
        assert!(!matches(Some(&s), &labels(&[("region", "eu")])));
        assert!(!matches(
            Some(&s),
            &labels(&[("region", "us"), ("tier", "edge")])
        ));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let node = labels(&[("region", "eu"), ("gpu", "")]);
        let one = |e| LabelSelector {
            match_expressions: Some(vec![e]),
            ..Default::default()
        };
        assert!(matches(
            Some(&one(expr("region", "In", &["eu", "us"]))),
            &node
        ));
        assert!(!matches(Some(&one(expr("region", "In", &["us"]))), &node));
        assert!(matches(Some(&one(expr("region", "NotIn", &["us"]))), &node));
        assert!(matches(Some(&one(expr("zone", "NotIn", &["a"]))), &node));
        assert!(matches(Some(&one(expr("gpu", "Exists", &[]))), &node));
        assert!(!matches(
            Some(&one(expr("gpu", "DoesNotExist", &[]))),
            &node
        ));
        assert!(!matches(Some(&one(expr("gpu", "Bogus", &[]))), &node));
    }

    #[test]
    fn check_refuses_what_the_api_server_refuses() {
        let one = |e| LabelSelector {
            match_expressions: Some(vec![e]),
            ..Default::default()
        };
        assert!(check(&one(expr("a", "In", &[])))
            .unwrap_err()
            .contains("needs values"));
        assert!(check(&one(expr("a", "Exists", &["x"])))
            .unwrap_err()
            .contains("takes no values"));
        assert!(check(&one(expr("a", "Near", &["x"])))
            .unwrap_err()
            .contains("unknown operator"));
        assert!(check(&one(expr("a", "NotIn", &["x"]))).is_ok());
    }
}

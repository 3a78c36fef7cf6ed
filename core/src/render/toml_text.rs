//! Just enough TOML writing for hosts.toml and registries.conf: quoted strings.
//!
//! The files are written line by line rather than through a TOML serializer because their
//! layout is part of the contract (byte-identical to what k3s generates, stable hashes), and
//! the order of `[host]` tables is semantic. Tests parse every rendered file back with a real
//! TOML parser.

/// A TOML basic string: `"..."` with quotes, backslashes and control characters escaped.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoted_strings_read_back_as_written() {
        for s in [
            "plain",
            "with \"quotes\"",
            r"back\slash",
            "tab\tnew\nline\r",
            "bell\u{7}",
            "ünïcödé",
            "",
        ] {
            let doc = format!("k = {}\n", quote(s));
            let parsed: toml::Table = toml::from_str(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
            assert_eq!(parsed["k"].as_str(), Some(s));
        }
    }
}

//! File names of the tree: point directories and VM directories.

use std::time::{SystemTime, UNIX_EPOCH};

/// A point's directory name: its UTC start time, sortable and safe in a file
/// name, e.g. `2026-11-23T181532.417Z` (no `:`, which some tools and
/// Windows shares refuse).
pub fn point_name(t: SystemTime) -> String {
    let nanos = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour][minute][second]");
    format!(
        "{}.{:03}Z",
        dt.format(&fmt)
            .unwrap_or_else(|_| "0000-00-00T000000".into()),
        dt.millisecond()
    )
}

/// A name from outside (a VM name, a volume label) as one path component:
/// `/`, `%`, NUL and a name that is `.`/`..`/empty are written as `%XX`.
/// Everything else, non-ASCII included, stays as it is.
pub fn safe_component(name: &str) -> String {
    if name.is_empty() {
        return "%00".into();
    }
    if name == "." || name == ".." {
        return name.replace('.', "%2E");
    }
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '/' => out.push_str("%2F"),
            '%' => out.push_str("%25"),
            '\0' => out.push_str("%00"),
            c => out.push(c),
        }
    }
    out
}

/// Make names unique within one directory: a repeated name gets `-<suffix>`
/// (the caller passes something unique per item, like the backup id's
/// random part).
pub fn dedupe(names: &mut [(String, String)]) {
    let mut seen = std::collections::HashSet::new();
    for (name, suffix) in names.iter_mut() {
        if !seen.insert(name.clone()) {
            *name = format!("{name}-{suffix}");
            seen.insert(name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn point_names_sort_by_time_and_are_safe() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_457_732_417);
        let n = point_name(t);
        assert_eq!(n, "2026-11-23T181532.417Z");
        let later = point_name(t + Duration::from_millis(1));
        assert!(later > n);
        assert!(!n.contains(':') && !n.contains('/'));
    }

    #[test]
    fn components_are_safe() {
        assert_eq!(safe_component("pgtest1"), "pgtest1");
        assert_eq!(safe_component("web/01"), "web%2F01");
        assert_eq!(safe_component(".."), "%2E%2E");
        assert_eq!(safe_component("a%b"), "a%25b");
        assert_eq!(safe_component("été"), "été");
    }

    #[test]
    fn duplicates_get_suffixes() {
        let mut v = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
            ("b".to_string(), "3".to_string()),
        ];
        dedupe(&mut v);
        assert_eq!(v[0].0, "a");
        assert_eq!(v[1].0, "a-2");
        assert_eq!(v[2].0, "b");
    }
}

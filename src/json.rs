//! Byte-level JSON scanning: the members of an object found without parsing it, so
//! that a body or an event can be edited by splicing its bytes. The input must already
//! be known to be valid JSON (serde checked it); on anything else the scan stops early.

use std::ops::Range;

/// Calls `f(key, member, value)` for each member of the object that starts at `open`
/// (a `{`), with the unescaped key when it is plain, and the byte ranges of the whole
/// member and of its value. Keys with escapes are passed decoded.
pub fn for_each_member(
    json: &[u8],
    open: usize,
    mut f: impl FnMut(&[u8], Range<usize>, Range<usize>),
) {
    let mut i = open + 1;
    loop {
        i = skip_space(json, i);
        if i >= json.len() || json[i] != b'"' {
            return;
        }
        let key_start = i;
        let key_end = skip_string(json, i);
        let raw_key = json
            .get(key_start + 1..key_end.saturating_sub(1))
            .unwrap_or_default();
        i = skip_space(json, key_end);
        if json.get(i) != Some(&b':') {
            return;
        }
        let value_start = skip_space(json, i + 1);
        let value_end = skip_value(json, value_start);
        if raw_key.contains(&b'\\') {
            if let Ok(key) = serde_json::from_slice::<String>(&json[key_start..key_end]) {
                f(key.as_bytes(), key_start..value_end, value_start..value_end);
            }
        } else {
            f(raw_key, key_start..value_end, value_start..value_end);
        }
        i = skip_space(json, value_end);
        if json.get(i) != Some(&b',') {
            return;
        }
        i += 1;
    }
}

pub fn skip_space(json: &[u8], mut i: usize) -> usize {
    while i < json.len() && json[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Index just past the string that starts at `i` (a `"`).
fn skip_string(json: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    json.len()
}

/// Index just past the value that starts at `i`; iterative, so depth costs nothing.
fn skip_value(json: &[u8], mut i: usize) -> usize {
    match json.get(i) {
        Some(b'"') => skip_string(json, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            while i < json.len() {
                match json[i] {
                    b'"' => {
                        i = skip_string(json, i);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            json.len()
        }
        _ => {
            while i < json.len()
                && !matches!(json[i], b',' | b'}' | b']')
                && !json[i].is_ascii_whitespace()
            {
                i += 1;
            }
            i
        }
    }
}

/// The bytes to cut from `json` to remove the member `key` of the object that opens at
/// `open`, when that member's value is `value` exactly (with the comma after it, or,
/// if it is the last, the one before); `None` when there is no such member.
pub fn member_cut(json: &[u8], open: usize, key: &[u8], value: &[u8]) -> Option<Range<usize>> {
    let mut previous: Option<Range<usize>> = None;
    let mut found: Option<(Option<Range<usize>>, Range<usize>)> = None;
    let mut next = None;
    for_each_member(json, open, |k, member, v| {
        if found.is_none() {
            if k == key && json[v] == *value {
                found = Some((previous.take(), member));
            } else {
                previous = Some(member);
            }
        } else if next.is_none() {
            next = Some(member.start);
        }
    });
    let (previous, member) = found?;
    Some(match (previous, next) {
        (_, Some(next)) => member.start..next,
        (Some(previous), None) => previous.end..member.end,
        (None, None) => member,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn without(json: &str) -> Option<String> {
        let cut = member_cut(json.as_bytes(), 0, b"usage", b"null")?;
        Some(format!("{}{}", &json[..cut.start], &json[cut.end..]))
    }

    #[test]
    fn a_member_leaves_with_one_comma() {
        assert_eq!(
            without(r#"{"a":1,"usage":null,"b":2}"#).unwrap(),
            r#"{"a":1,"b":2}"#
        );
        assert_eq!(without(r#"{"a":1, "usage" : null}"#).unwrap(), r#"{"a":1}"#);
        assert_eq!(
            without(r#"{"usage":null,"b":[1,{"usage":null}]}"#).unwrap(),
            r#"{"b":[1,{"usage":null}]}"#
        );
        assert_eq!(without(r#"{"usage":null}"#).unwrap(), "{}");
        assert_eq!(without(r#"{"a":""usage":null"}"#), None, "inside a string");
        assert_eq!(
            without(r#"{"b":{"usage":null}}"#),
            None,
            "not at the top level"
        );
        assert_eq!(without(r#"{"usage":{"total_tokens":3}}"#), None, "not null");
    }
}

//! The top-level `usage` and `id` of a JSON answer, read as its bytes pass through the
//! relay: a byte-level scanner that tracks strings and nesting and keeps only those
//! two members' values, each within a fixed bound, wherever they sit in the object.

use super::Usage;

/// The most of a `usage` value kept (Azure's, with its token details, is a few hundred
/// bytes); a larger one is not read.
const MAX_USAGE: usize = 4 * 1024;
/// The longest response id remembered, in bytes (Azure's are about 50); a longer one
/// is not kept (the quotes of its JSON string come on top).
pub const MAX_ID: usize = 256;
/// Member names longer than this cannot be `usage` or `id`: not kept.
const MAX_NAME: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Member {
    Usage,
    Id,
}

/// A value being kept, and whether it outgrew its bound.
#[derive(Debug, Default)]
struct Kept {
    bytes: Vec<u8>,
    over: bool,
}

impl Kept {
    fn start(&mut self) {
        self.bytes.clear();
        self.over = false;
    }

    fn push(&mut self, b: u8, max: usize) {
        if self.bytes.len() < max {
            self.bytes.push(b);
        } else {
            self.over = true;
        }
    }

    fn value(&self) -> Option<&[u8]> {
        (!self.over && !self.bytes.is_empty()).then_some(&self.bytes[..])
    }
}

/// The scanner's state between the pieces of one answer.
#[derive(Debug, Default)]
pub struct Scan {
    depth: u32,
    /// The outermost value is an object (only its members are read).
    object: bool,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a member's name.
    expect_name: bool,
    /// The name being read, or the last one read, while it may still be `usage` or `id`.
    name: Vec<u8>,
    name_is_key: bool,
    /// The member whose value is being kept, once its `:` was seen.
    keeping: Option<Member>,
    usage: Kept,
    id: Kept,
}

impl Scan {
    /// Reads the next piece of the answer.
    pub fn feed(&mut self, piece: &[u8]) {
        for &b in piece {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            self.keep(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            } else if self.name_is_key && self.name.len() < MAX_NAME {
                self.name.push(b);
            } else {
                self.name_is_key = false;
            }
            return;
        }
        if self.depth == 1 && self.object && matches!(b, b',' | b'}') {
            self.keeping = None;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.name_is_key = self.depth == 1 && self.object && self.expect_name;
                if self.name_is_key {
                    self.name.clear();
                    self.expect_name = false;
                }
            }
            b':' if self.depth == 1 && self.object => {
                self.keeping = match &self.name[..] {
                    b"usage" => Some(Member::Usage),
                    b"id" => Some(Member::Id),
                    _ => None,
                };
                self.name.clear();
                match self.keeping {
                    Some(Member::Usage) => self.usage.start(),
                    Some(Member::Id) => self.id.start(),
                    None => {}
                }
                return;
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    self.object = b == b'{';
                    self.expect_name = self.object;
                }
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b',' if self.depth == 1 => self.expect_name = self.object,
            _ => {}
        }
        self.keep(b);
    }

    fn keep(&mut self, b: u8) {
        match self.keeping {
            Some(Member::Usage) => self.usage.push(b, MAX_USAGE),
            Some(Member::Id) => self.id.push(b, MAX_ID + 2),
            None => {}
        }
    }

    /// The usage and the id the answer's top level carried, if each was whole and
    /// within its bound.
    pub fn found(&self) -> (Option<Usage>, Option<String>) {
        let usage = self
            .usage
            .value()
            .and_then(|v| serde_json::from_slice::<Option<Usage>>(v).ok().flatten());
        let id = self
            .id
            .value()
            .and_then(|v| serde_json::from_slice::<String>(v).ok())
            .filter(|id| id.len() <= MAX_ID);
        (usage, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `json` in pieces of `step` bytes.
    fn scan(json: &str, step: usize) -> (Option<Usage>, Option<String>) {
        let mut s = Scan::default();
        for piece in json.as_bytes().chunks(step) {
            s.feed(piece);
        }
        s.found()
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 7,
        completion_tokens: 2,
        total_tokens: 9,
    };

    #[test]
    fn finds_the_top_level_members_wherever_they_sit_and_however_the_bytes_are_cut() {
        let docs = [
            r#"{"id":"resp_1","usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
            r#"{ "usage" : {"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"details":{"x":[1,{"y":"}"}]}} , "id" : "resp_1" }"#,
            r#"{"data":[{"id":"inner","usage":{"prompt_tokens":1}}],"note":"\"usage\": {}, \"id\":\"no\"","id":"resp_1","usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9}}"#,
        ];
        for doc in docs {
            for step in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    scan(doc, step),
                    (Some(USAGE), Some("resp_1".into())),
                    "{doc} / {step}"
                );
            }
        }
    }

    #[test]
    fn nested_arrays_strings_and_null_usage_are_not_taken_for_the_top_level() {
        assert_eq!(
            scan(r#"[{"usage":{"total_tokens":1},"id":"a"}]"#, 3),
            (None, None)
        );
        assert_eq!(scan(r#"{"usage":null,"id":5}"#, 1), (None, None));
        assert_eq!(
            scan(r#"{"x":{"id":"a","usage":{"total_tokens":1}}}"#, 4),
            (None, None)
        );
        assert_eq!(
            scan(r#"{"ids":"a","usages":{"total_tokens":1}}"#, 4),
            (None, None)
        );
    }

    #[test]
    fn values_past_their_bound_are_dropped() {
        let long = format!(
            r#"{{"id":"{}","usage":{{"total_tokens":1,"pad":"{}"}}}}"#,
            "i".repeat(MAX_ID + 1),
            "p".repeat(MAX_USAGE)
        );
        assert_eq!(scan(&long, 100), (None, None));
        let at_bound = format!(r#"{{"id":"{}"}}"#, "i".repeat(MAX_ID));
        assert_eq!(scan(&at_bound, 100).1.map(|id| id.len()), Some(MAX_ID));
    }
}

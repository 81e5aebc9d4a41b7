//! `--env-file`: variables from a file of `KEY=VALUE` lines (the subset of systemd's
//! `EnvironmentFile` syntax that secrets files use), read at start and again on every
//! reload, so that a rotated key needs no restart. Errors name the file and line,
//! never a value.

use super::{ConfigError, Env};
use std::path::Path;

/// Reads `path`: `KEY=VALUE` per line, optionally after `export ` (so a file written
/// for the shell's `source` reads too); blank lines and lines starting with `#` or `;`
/// are skipped; spaces around the key and the value are trimmed; a value wholly inside
/// `"..."` or `'...'` loses the quotes, and one that opens a quote without closing it
/// is an error (taken literally, it would surface later as a bad key or URL). A key may hold any character but `=` and
/// white space, so `API_INSTANCE_X_MODEL_MAP_GPT-4O=...` (which no shell can `export`)
/// can be written here.
pub fn read(path: &Path) -> Result<Env, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{} (--env-file): cannot read: {e}", path.display())))?;
    parse(&text).map_err(|(line, why)| {
        ConfigError(format!("{}:{line} (--env-file): {why}", path.display()))
    })
}

/// The variables of an env file's text, or the first bad line (1-based) and why.
fn parse(text: &str) -> Result<Env, (usize, &'static str)> {
    let mut env = Env::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        let line = line
            .strip_prefix("export")
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .map_or(line, str::trim_start);
        let (key, value) = line
            .split_once('=')
            .ok_or((i + 1, "not a KEY=VALUE line"))?;
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err((i + 1, "the name before `=` is empty or contains a space"));
        }
        let value =
            unquote(value.trim()).ok_or((i + 1, "a quote opened in the value is not closed"))?;
        env.insert(key.to_string(), value.to_string());
    }
    Ok(env)
}

/// The value without its quotes; `None` when it opens a quote it does not close.
fn unquote(value: &str) -> Option<&str> {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote) {
            return inner.strip_suffix(quote);
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_and_quotes() {
        let env = parse(
            "# secrets\n\n; also a comment\nA=1\n  B = two words \nC=\"quoted # not a comment\"\nD='x'\nE=\nAPI_INSTANCE_X_MODEL_MAP_GPT-4O=dep\nF=a=b\n",
        )
        .unwrap();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("quoted # not a comment"));
        assert_eq!(get("D"), Some("x"));
        assert_eq!(get("E"), Some(""));
        assert_eq!(get("API_INSTANCE_X_MODEL_MAP_GPT-4O"), Some("dep"));
        assert_eq!(get("F"), Some("a=b"), "only the first = splits");
        assert_eq!(env.len(), 7);
    }

    #[test]
    fn export_lines_read_as_the_shell_reads_them() {
        let env = parse(
            "export A=1
export\tB='two'
exported=3
",
        )
        .unwrap();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two"));
        assert_eq!(
            get("exported"),
            Some("3"),
            "only `export` and a space is the keyword"
        );
    }

    #[test]
    fn an_unterminated_quote_is_an_error_on_its_line() {
        assert_eq!(
            parse("A=1\nB=\"https://x.openai.azure.com\nC=2\n"),
            Err((2, "a quote opened in the value is not closed"))
        );
        assert_eq!(parse("K='\n").unwrap_err().0, 1);
        assert_eq!(parse("K=\"a'\n").unwrap_err().0, 1);
    }

    #[test]
    fn a_bad_line_is_named_by_number_without_its_text() {
        assert_eq!(parse("A=1\nsk-secret-value\n").unwrap_err().0, 2);
        assert_eq!(parse("=x").unwrap_err().0, 1);
        assert_eq!(parse("MY KEY=x").unwrap_err().0, 1);
        let e = read(Path::new("/nonexistent/env")).unwrap_err().0;
        assert!(
            e.starts_with("/nonexistent/env (--env-file): cannot read"),
            "{e}"
        );
    }
}

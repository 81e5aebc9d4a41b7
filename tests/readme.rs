//! The README's quick start, checked against what it shows: the commands are the ones
//! the stand-in tests run, every curl request it shows (path and body, exactly as
//! written) answers 200 through the proxy on `ENVIRONMENT=fake`, and every link to a
//! Markdown file in README.md and docs/ names a file that exists.

mod common;
use common::send;
use common::stand_in::FakeAzure;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where the quick start says the proxy listens (`port: 3010` in config/base.yaml).
const PROXY: &str = "http://127.0.0.1:3010";

fn read(path: impl AsRef<Path>) -> String {
    let path = Path::new(ROOT).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `sh` fenced blocks of the README's "Quick start" section, backslash-continued
/// lines joined.
fn quick_start_commands(readme: &str) -> Vec<String> {
    let start = readme
        .find("\n## Quick start")
        .expect("a Quick start section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut line = String::new();
    for raw in section.lines() {
        if raw.trim_start().starts_with("```") {
            in_sh = !in_sh && raw.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        match raw.strip_suffix('\\') {
            Some(part) => line.push_str(part),
            None => {
                line.push_str(raw);
                commands.push(std::mem::take(&mut line));
            }
        }
    }
    commands
}

/// A curl command's URL and its `-d '...'` body, if any.
fn curl_request(command: &str) -> (String, Option<String>) {
    let url = command
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {command:?}"));
    let body = command.split_once(" -d '").map(|(_, rest)| {
        let end = rest.rfind('\'').expect("the -d body's closing quote");
        rest[..end].to_string()
    });
    (url.to_string(), body)
}

#[test]
fn the_quick_start_shows_the_commands_the_tests_run() {
    let commands = quick_start_commands(&read("README.md"));
    let stand_in = commands
        .iter()
        .find(|c| c.contains("--example"))
        .expect("a command that starts the stand-in");
    let example = stand_in
        .split_whitespace()
        .skip_while(|w| *w != "--example")
        .nth(1)
        .unwrap();
    assert_eq!(
        example, "fake-azure",
        "the example the tests build: {stand_in}"
    );
    let proxy = commands
        .iter()
        .find(|c| c.starts_with("ENVIRONMENT="))
        .expect("a command that starts the proxy with an overlay");
    let overlay = proxy["ENVIRONMENT=".len()..].split_whitespace().next();
    assert_eq!(overlay, Some("fake"), "the overlay the tests use: {proxy}");
    assert!(
        proxy.contains("cargo run"),
        "the proxy is started with cargo: {proxy}"
    );
    assert!(
        read("config/base.yaml")
            .contains(&format!("\nport: {}\n", PROXY.rsplit(':').next().unwrap())),
        "the curl commands' port is the configuration's"
    );
}

#[test]
fn every_quick_start_request_answers_200_through_the_stand_in() {
    let commands = quick_start_commands(&read("README.md"));
    let requests: Vec<_> = commands
        .iter()
        .filter(|c| c.starts_with("curl "))
        .map(|c| curl_request(c))
        .collect();
    assert!(
        requests.iter().filter(|(_, body)| body.is_some()).count() >= 2,
        "a chat completion and a stream: {requests:?}"
    );
    let fake = FakeAzure::start();
    let proxy = fake.proxy();
    for (url, body) in &requests {
        let path = url
            .strip_prefix(PROXY)
            .unwrap_or_else(|| panic!("{url} is not on {PROXY}"));
        let answer = match body {
            Some(body) => send(
                "POST",
                &proxy.url(path),
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            ),
            None => send("GET", &proxy.url(path), &[], None),
        };
        assert_eq!(
            answer.status,
            200,
            "{url} {body:?}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
}

/// The relative `.md` links of a Markdown file, `](target)` without its `#anchor`.
fn markdown_links(text: &str) -> Vec<&str> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(|target| target.split('#').next().unwrap_or(""))
        .filter(|t| t.ends_with(".md") && !t.contains("://"))
        .collect()
}

#[test]
fn every_markdown_link_in_the_readme_and_docs_names_a_file() {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let name = entry.unwrap().file_name();
        if name.to_string_lossy().ends_with(".md") {
            files.push(Path::new("docs").join(name));
        }
    }
    let mut checked = 0;
    let mut missing = Vec::new();
    for file in &files {
        let dir = file.parent().unwrap();
        for link in markdown_links(&read(file)) {
            checked += 1;
            if !Path::new(ROOT).join(dir).join(link).is_file() {
                missing.push(format!("{}: {link}", file.display()));
            }
        }
    }
    assert!(checked > files.len(), "links found: {checked}");
    assert!(missing.is_empty(), "links to no file: {missing:?}");
}

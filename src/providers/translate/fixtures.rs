//! The data-driven test of every translation: each file in `tests/fixtures/translate/` holds a
//! header naming the translation, the input (one JSON value or stream event per line) and the
//! expected output (one JSON value or SSE `data:` payload per line). `UPDATE_EXPECT=1 cargo
//! test --lib translate` rewrites the expected sections (review the diff before committing).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{anthropic, gemini, openai::StreamOut, parse_openai_chat};

const ID: &str = "chatcmpl-fixture";
const CREATED: u64 = 1_700_000_000;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Options {
    model: String,
    include_usage: bool,
    default_max_tokens: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            model: "requested-model".to_owned(),
            include_usage: false,
            default_max_tokens: 4096,
        }
    }
}

struct Case {
    kind: String,
    options: Options,
    header: Vec<String>,
    input: Vec<String>,
    expect: Vec<String>,
}

fn parse(path: &Path, text: &str) -> Case {
    let mut header = Vec::new();
    let mut input = Vec::new();
    let mut expect = Vec::new();
    let mut section = 0;
    for line in text.lines() {
        match line {
            "--- input" => section = 1,
            "--- expect" => section = 2,
            _ => match section {
                0 => header.push(line.to_owned()),
                1 if !line.trim().is_empty() => input.push(line.to_owned()),
                2 if !line.trim().is_empty() => expect.push(line.to_owned()),
                _ => {}
            },
        }
    }
    let mut kind = None;
    let mut options = Options::default();
    for line in &header {
        if let Some(k) = line.strip_prefix("# translate: ") {
            kind = Some(k.trim().to_owned());
        } else if let Some(o) = line.strip_prefix("# options: ") {
            options = serde_json::from_str(o).unwrap();
        }
    }
    let kind = kind.unwrap_or_else(|| panic!("{}: no `# translate:` line", path.display()));
    Case {
        kind,
        options,
        header,
        input,
        expect,
    }
}

fn json_line<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

fn outs(out: Vec<StreamOut>) -> impl Iterator<Item = String> {
    out.into_iter().map(|o| o.data())
}

fn run(case: &Case) -> Vec<String> {
    let o = &case.options;
    let one = || case.input.join("\n");
    match case.kind.as_str() {
        "openai-to-anthropic" => {
            let result = parse_openai_chat(one().as_bytes())
                .and_then(|r| anthropic::request(&r, o.default_max_tokens));
            vec![match result {
                Ok(r) => json_line(&r),
                Err(e) => format!("error: {e}"),
            }]
        }
        "openai-to-gemini" => {
            let result = parse_openai_chat(one().as_bytes()).and_then(|r| gemini::request(&r));
            vec![match result {
                Ok(r) => json_line(&r),
                Err(e) => format!("error: {e}"),
            }]
        }
        "anthropic-to-openai" => {
            let resp: anthropic::MessagesResponse = serde_json::from_str(&one()).unwrap();
            vec![json_line(&anthropic::response(
                &resp, ID, CREATED, &o.model,
            ))]
        }
        "gemini-to-openai" => {
            let resp: gemini::GenerateContentResponse = serde_json::from_str(&one()).unwrap();
            vec![json_line(&gemini::response(&resp, ID, CREATED, &o.model))]
        }
        "anthropic-stream" => {
            let mut t = anthropic::StreamTranslator::new(
                ID.to_owned(),
                CREATED,
                o.model.clone(),
                o.include_usage,
            );
            let mut lines = Vec::new();
            for line in &case.input {
                let event: anthropic::StreamEvent = serde_json::from_str(line).unwrap();
                lines.extend(outs(t.on_event(event)));
            }
            lines
        }
        "gemini-stream" => {
            let mut t = gemini::StreamTranslator::new(
                ID.to_owned(),
                CREATED,
                o.model.clone(),
                o.include_usage,
            );
            let mut lines = Vec::new();
            for line in &case.input {
                let event: gemini::GenerateContentResponse = serde_json::from_str(line).unwrap();
                lines.extend(outs(t.on_event(event)));
            }
            lines.extend(outs(t.finish()));
            lines
        }
        other => panic!("unknown translation `{other}`"),
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/translate")
}

#[test]
fn fixtures() {
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir().display());
    let mut failures = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap();
        let case = parse(path, &text);
        let actual = run(&case);
        if actual == case.expect {
            continue;
        }
        if update {
            let mut out = case.header.join("\n");
            out.push_str("\n--- input\n");
            out.push_str(&case.input.join("\n"));
            out.push_str("\n--- expect\n");
            out.push_str(&actual.join("\n"));
            out.push('\n');
            std::fs::write(path, out).unwrap();
        } else {
            failures.push(format!(
                "{}:\n  expected:\n    {}\n  actual:\n    {}",
                path.display(),
                case.expect.join("\n    "),
                actual.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

//! Parse-error recovery for `msgnode policy check`: regorus's parser stops at a module's first
//! error, so the statement that holds it is blanked (every character but line breaks becomes
//! a space, so later lines and columns stay where they were) and the module is parsed again,
//! until it parses or nothing more can be blanked. A statement is what begins on a line
//! starting at column 0 with a name (a rule, `default`, `import`, `package`) and runs to the
//! next such line.

use super::bundle::BundleError;
use super::engine::rego_error;

/// Rounds of blank-and-parse per module: a bound on the work one file can cause.
const MAX_ROUNDS: usize = 64;

/// What parsing a module with recovery found.
pub(crate) struct Recovered {
    /// Every parse error, in order, each once.
    pub errors: Vec<BundleError>,
    /// The source with each failing statement blanked.
    pub text: String,
    /// Whether `text` parses (false when the error is in the `package` line itself).
    pub parses: bool,
    /// Names the blanked statements defined: a call to one of them is not a new error.
    pub blanked_names: Vec<String>,
}

/// Parses `raw` (the module at `path`), recovering after each error.
pub(crate) fn recover(path: &str, raw: &str) -> Recovered {
    let mut recovered = Recovered {
        errors: Vec::new(),
        text: raw.to_string(),
        parses: false,
        blanked_names: Vec::new(),
    };
    for _ in 0..MAX_ROUNDS {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        let Err(e) = engine.add_policy(path.to_string(), recovered.text.clone()) else {
            recovered.parses = true;
            return recovered;
        };
        let error = rego_error(path, &e.to_string());
        let row = error.location().map(|l| l.row);
        let seen = recovered
            .errors
            .iter()
            .any(|e| e.to_string() == error.to_string());
        if seen {
            // Blanking did not move the parser on: what follows cannot be trusted.
            return recovered;
        }
        recovered.errors.push(error);
        let Some((from, to)) = row.and_then(|row| statement_at(&recovered.text, row)) else {
            return recovered;
        };
        let lines: Vec<&str> = recovered.text.split_inclusive('\n').collect();
        if let Some(name) = lines.get(from).and_then(|line| head_name(line)) {
            recovered.blanked_names.push(name);
        }
        recovered.text = blank(&lines, from, to);
    }
    recovered
}

/// Whether `message` (a compile error) is only a consequence of a blanked statement: a call
/// to a function it defined.
pub(crate) fn is_cascade(message: &str, blanked_names: &[String]) -> bool {
    message
        .strip_prefix("could not find function ")
        .map(|f| f.trim().rsplit('.').next().unwrap_or(f))
        .is_some_and(|f| blanked_names.iter().any(|n| n == f))
}

/// The lines `[from, to)` (0-based) of the statement that holds the error at `row` (1-based),
/// or `None` when it is in the `package` line or before it. An error on a statement's first
/// line belongs to the statement before it when that one left a bracket open (`allow if {`
/// never closed: the parser only notices at the next rule), unless that is the `package`
/// line.
fn statement_at(text: &str, row: u32) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let starts: Vec<usize> = (0..lines.len()).filter(|&i| is_start(lines[i])).collect();
    let package = *starts
        .iter()
        .find(|&&i| first_word(lines[i]) == "package")?;
    let row = usize::try_from(row)
        .ok()?
        .saturating_sub(1)
        .min(lines.len().saturating_sub(1));
    if starts.contains(&row) {
        if let Some(&before) = starts.iter().rev().find(|&&i| i < row) {
            if before > package && left_open(&lines[before..row]) {
                return Some((before, row));
            }
        }
    }
    let start = *starts.iter().rev().find(|&&i| i <= row)?;
    let end = starts
        .iter()
        .copied()
        .find(|&i| i > row)
        .unwrap_or(lines.len());
    (start > package).then_some((start, end))
}

/// Whether `lines` open more brackets than they close (strings and comments skipped).
fn left_open(lines: &[&str]) -> bool {
    let mut depth = 0i64;
    for line in lines {
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '#' => break,
                '"' => {
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => {
                                chars.next();
                            }
                            '"' => break,
                            _ => {}
                        }
                    }
                }
                '`' => {
                    for c in chars.by_ref() {
                        if c == '`' {
                            break;
                        }
                    }
                }
                '{' | '[' | '(' => depth += 1,
                '}' | ']' | ')' => depth -= 1,
                _ => {}
            }
        }
    }
    depth > 0
}

/// A line that begins a statement: a name at column 0 (`else` continues a rule).
fn is_start(line: &str) -> bool {
    line.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') && first_word(line) != "else"
}

fn first_word(line: &str) -> &str {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(line.len());
    &line[..end]
}

/// The name a statement's first line defines (`f(x) := …` → `f`; `default allow := …` →
/// `allow`); none for `import` and `package`.
fn head_name(line: &str) -> Option<String> {
    let word = first_word(line);
    let name = match word {
        "import" | "package" | "" => return None,
        "default" => first_word(line[word.len()..].trim_start()),
        _ => word,
    };
    (!name.is_empty()).then(|| name.to_string())
}

/// `lines` joined, with every character of lines `[from, to)` but line breaks a space.
fn blank(lines: &[&str], from: usize, to: usize) -> String {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| match (from..to).contains(&i) {
            true => line
                .chars()
                .map(|c| if c == '\n' || c == '\r' { c } else { ' ' })
                .collect(),
            false => line.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(recovered: &Recovered) -> Vec<u32> {
        recovered
            .errors
            .iter()
            .filter_map(|e| e.location().map(|l| l.row))
            .collect()
    }

    #[test]
    fn every_broken_statement_is_reported_once_at_its_own_line() {
        let source = "package a\n\nallow if {\n  input.a ==\n}\n\nok if { input.b == 1 }\n\
                      \nf(x) := y if {\n  y := x +\n}\n\ng if { input.c ==  }\n";
        let recovered = recover("a.rego", source);
        assert_eq!(rows(&recovered), vec![5, 10, 13], "{:?}", recovered.errors);
        assert!(recovered.parses);
        assert_eq!(recovered.blanked_names, vec!["allow", "f", "g"]);
        // Blanked, not removed: the statement that was fine is still on line 7, column 1.
        assert_eq!(recovered.text.lines().count(), source.lines().count());
        assert_eq!(
            recovered.text.lines().nth(6),
            Some("ok if { input.b == 1 }")
        );
        assert!(recovered
            .text
            .lines()
            .nth(3)
            .is_some_and(|l| l.trim().is_empty()));
    }

    #[test]
    fn an_unclosed_rule_is_blamed_not_the_rule_after_it() {
        let source = "package a\n\nallow if {\n  input.a == 1\n\ndeny if { input.b }\n";
        let recovered = recover("a.rego", source);
        assert_eq!(recovered.errors.len(), 1, "{:?}", recovered.errors);
        assert!(recovered.parses);
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        assert!(left_open(&["allow if {\n", "  x := \"}\" # }\n"]));
        assert!(!left_open(&["allow if { x := `{` }\n"]));
    }

    #[test]
    fn an_error_in_the_package_line_stops_there() {
        let recovered = recover("a.rego", "package 1a\n\nallow if { input.a == }\n");
        assert_eq!(recovered.errors.len(), 1);
        assert!(!recovered.parses);
    }

    #[test]
    fn a_call_to_a_blanked_function_is_a_cascade() {
        let names = vec!["f".to_string()];
        assert!(is_cascade("could not find function f", &names));
        assert!(is_cascade("could not find function data.a.f", &names));
        assert!(!is_cascade("could not find function g", &names));
        assert!(!is_cascade("var f is unsafe", &names));
    }
}

//! How a config or catalogue error is reported: [`ConfigError`] names the file, the line
//! and the field and says what would be accepted; [`Ctx`] finds lines from TOML spans;
//! [`toml_error`] turns the TOML parser's errors into that form. A leaf module.

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.field, self.message)
        }
    }
}

pub struct Ctx<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Ctx<'_> {
    pub fn line_of(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    pub fn err(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: span.map(|s| self.line_of(s)),
            field: field.into(),
            message: msg.into(),
        }
    }

    pub fn at<T>(
        &self,
        v: &Spanned<T>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        self.err(Some(v.span()), field, msg)
    }
}

/// Top-level tables the file must have (a missing one has no line to point at).
pub const REQUIRED_TABLES: [&str; 3] = ["interfaces", "upload", "download"];

/// A TOML syntax or type error as a [`ConfigError`]: the message on one line
/// (serde's unknown-field message lists what is accepted; it is kept), and
/// for errors about one key (wrong type, unknown, missing or duplicate key)
/// the key's path, found from where the error points.
pub fn toml_error(cx: &Ctx<'_>, e: &toml::de::Error) -> ConfigError {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    // The name in "unknown field `x`, expected ..." / "missing field `x`".
    let named = |prefix: &str| -> Option<String> {
        let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
        rest.split_once('`').map(|(k, _)| k.to_string())
    };
    let unknown = named("unknown field ");
    let missing = named("missing field ");
    if let Some(m) = missing.as_deref().filter(|m| REQUIRED_TABLES.contains(m)) {
        return cx.err(None, m, format!("{message}: the [{m}] table is required"));
    }
    let about_a_key = [
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown field",
        "missing field",
        "duplicate key",
        "unknown variant",
    ]
    .iter()
    .any(|p| message.starts_with(p));
    let field = match e.span() {
        Some(span) if about_a_key => {
            field_path(cx.text, span.start, unknown.as_deref(), missing.as_deref())
        }
        _ => String::new(),
    };
    cx.err(e.span(), field, message)
}

/// `[name]` -> ("name", false), `[[name]]` -> ("name", true), else None.
pub fn table_header(line: &str) -> Option<(String, bool)> {
    let l = line.trim();
    let (inner, array) = if let Some(r) = l.strip_prefix("[[") {
        (r.split("]]").next()?, true)
    } else {
        (l.strip_prefix('[')?.split(']').next()?, false)
    };
    let name = inner
        .split('.')
        .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".");
    Some((name, array))
}

/// The dotted path of the key at byte `pos` of `text` ("class[1].priority"),
/// from the table header above it and the key on its line. `unknown` and
/// `missing` are the key a serde error names, if any. A best effort for
/// messages: the file is already known to be malformed.
pub fn field_path(text: &str, pos: usize, unknown: Option<&str>, missing: Option<&str>) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let at = text
        .get(..pos.min(text.len()))
        .map_or(0, |t| t.bytes().filter(|&b| b == b'\n').count())
        .min(lines.len().saturating_sub(1));
    let header = (0..=at)
        .rev()
        .find_map(|i| table_header(lines[i]).map(|(n, a)| (i, n, a)));
    let table = match &header {
        None => String::new(),
        Some((i, name, false)) => {
            let _ = i;
            name.clone()
        }
        Some((i, name, true)) => {
            let index = lines[..=*i]
                .iter()
                .filter(|l| table_header(l).is_some_and(|(n, a)| a && n == *name))
                .count()
                - 1;
            format!("{name}[{index}]")
        }
    };
    let join = |k: &str| {
        if table.is_empty() {
            k.to_string()
        } else {
            format!("{table}.{k}")
        }
    };
    match &header {
        // The error points at a table header: a key missing from it, or the
        // table itself unknown or of the wrong kind.
        Some((i, name, _)) if *i == at => match missing {
            Some(m) => join(m),
            None if unknown.is_some() => name.clone(),
            None => table,
        },
        _ => {
            // The key of this line, or of the line above for a value that
            // runs over several lines.
            let first = header.as_ref().map_or(0, |(i, _, _)| i + 1);
            let key = (first..=at).rev().find_map(|i| {
                let (k, _) = lines[i].split_once('=')?;
                let k = k.trim().trim_matches(|c| c == '"' || c == '\'');
                (!k.is_empty() && !k.starts_with('#')).then_some(k)
            });
            match unknown.or(missing).or(key) {
                Some(k) => join(k),
                None => table,
            }
        }
    }
}

//! Allowlist text → entries. Squid `dstdomain` compatible:
//!
//! - `example.com`   that name only
//! - `.example.com`  example.com and every name below it
//! - `*.example.com` every name below example.com, not example.com itself
//!
//! `#` starts a comment; blank lines are ignored. Anything else that is not
//! a valid host name fails the whole list: a gateway must never run with a
//! list that says something other than what its author meant.

use super::trie::Allowlist;
use crate::name::{HostName, NameError};

/// How an entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// `example.com`
    Exact,
    /// `.example.com`
    Domain,
    /// `*.example.com`
    Subdomains,
}

/// One allowlist line, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub name: HostName,
    /// 1-based line number in the source text.
    pub line: usize,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            EntryKind::Exact => write!(f, "{}", self.name),
            EntryKind::Domain => write!(f, ".{}", self.name),
            EntryKind::Subdomains => write!(f, "*.{}", self.name),
        }
    }
}

/// A list that cannot be used, and the line that makes it so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct ParseError {
    pub line: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("{entry:?}: {source}")]
    BadName { entry: String, source: NameError },
    #[error("{0:?} matches everything; list the domains instead")]
    MatchesEverything(String),
    #[error("{0:?} is a whole public suffix; list the domains below it instead")]
    PublicSuffix(String),
    #[error("{0:?} has more than one entry; write one per line")]
    SeveralEntries(String),
    #[error("{0:?}: '*' is only allowed as a leading '*.' label")]
    MisplacedWildcard(String),
}

/// Parses a whole list. Fails on the first invalid line.
pub fn parse(text: &str) -> Result<Allowlist, ParseError> {
    let mut list = Allowlist::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if let Some(entry) = parse_line(raw, line).map_err(|kind| ParseError { line, kind })? {
            list.insert(entry);
        }
    }
    Ok(list)
}

fn parse_line(raw: &str, line: usize) -> Result<Option<Entry>, ParseErrorKind> {
    // No host name contains '#', so everything after one is a comment.
    let text = raw.split('#').next().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.split_whitespace().nth(1).is_some() {
        return Err(ParseErrorKind::SeveralEntries(text.to_string()));
    }
    let (kind, rest) = if let Some(rest) = text.strip_prefix("*.") {
        (EntryKind::Subdomains, rest)
    } else if let Some(rest) = text.strip_prefix('.') {
        (EntryKind::Domain, rest)
    } else {
        (EntryKind::Exact, text)
    };
    if rest.is_empty() || rest == "." || text == "*" {
        return Err(ParseErrorKind::MatchesEverything(text.to_string()));
    }
    if rest.contains('*') {
        return Err(ParseErrorKind::MisplacedWildcard(text.to_string()));
    }
    let name = HostName::from_config(rest).map_err(|source| ParseErrorKind::BadName {
        entry: text.to_string(),
        source,
    })?;
    if is_public_suffix(name.as_str()) {
        return Err(ParseErrorKind::PublicSuffix(text.to_string()));
    }
    Ok(Some(Entry { kind, name, line }))
}

/// A single label (`com`, `internal`) or an ICANN suffix (`co.uk`). Private
/// suffixes such as `s3.amazonaws.com` stay allowed: Squid lists name them
/// on purpose, and they belong to one operator.
fn is_public_suffix(name: &str) -> bool {
    if !name.contains('.') {
        return true;
    }
    psl::suffix(name.as_bytes())
        .is_some_and(|s| s.as_bytes() == name.as_bytes() && s.typ() == Some(psl::Type::Icann))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ParseError {
        parse(text).expect_err(text)
    }

    #[test]
    fn skips_comments_and_blank_lines() {
        let list = parse("# header\n\n  example.com  # billing\n\t\n.example.org\n").unwrap();
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn normalises_case_trailing_dot_and_unicode() {
        let list = parse("WWW.Example.COM.\n.Bücher.DE\n*.Foo.Example\n").unwrap();
        let rules: Vec<String> = list.entries().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            rules,
            ["www.example.com", ".xn--bcher-kva.de", "*.foo.example"]
        );
    }

    #[test]
    fn names_the_line_of_the_first_bad_entry() {
        let e = err("ok.example.com\n# fine\nbad_host!.com\nalso bad!\n");
        assert_eq!(e.line, 3);
        assert!(e.to_string().starts_with("line 3: "), "{e}");
    }

    #[test]
    fn rejects_entries_that_match_everything() {
        for text in ["*", ".", "*.", "..", "*.."] {
            let e = err(text);
            assert_eq!(e.line, 1, "{text}");
        }
        assert!(matches!(
            err("*").kind,
            ParseErrorKind::MatchesEverything(_)
        ));
        assert!(matches!(
            err(".").kind,
            ParseErrorKind::MatchesEverything(_)
        ));
    }

    #[test]
    fn rejects_ip_addresses() {
        for text in [
            "192.0.2.10",
            ".192.0.2.10",
            "*.192.0.2.10",
            "2001:db8::1",
            "[2001:db8::1]",
        ] {
            assert!(
                matches!(
                    err(text).kind,
                    ParseErrorKind::BadName {
                        source: NameError::IpLiteral,
                        ..
                    }
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_illegal_characters_and_lengths() {
        assert!(matches!(
            err("exa$mple.com").kind,
            ParseErrorKind::BadName {
                source: NameError::IllegalChar('$'),
                ..
            }
        ));
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            err(&long_label).kind,
            ParseErrorKind::BadName {
                source: NameError::LabelTooLong,
                ..
            }
        ));
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        assert!(matches!(
            err(&long_name).kind,
            ParseErrorKind::BadName {
                source: NameError::TooLong,
                ..
            }
        ));
        assert!(matches!(
            err("a.example.com b.example.com").kind,
            ParseErrorKind::SeveralEntries(_)
        ));
        assert!(matches!(
            err("foo.*.example.com").kind,
            ParseErrorKind::MisplacedWildcard(_)
        ));
        assert!(matches!(
            err("**.example.com").kind,
            ParseErrorKind::MisplacedWildcard(_)
        ));
    }

    #[test]
    fn rejects_whole_public_suffixes() {
        for text in [
            ".com",
            "com",
            "*.com",
            ".co.uk",
            "co.uk",
            "*.co.uk",
            ".internal",
            ".ck",
            "*.foo.ck",
        ] {
            // `foo.ck` is itself a suffix under the `*.ck` rule.
            assert!(
                matches!(err(text).kind, ParseErrorKind::PublicSuffix(_)),
                "{text}"
            );
        }
        assert!(parse(".example.co.uk\n.s3.amazonaws.com\n.github.io\n").is_ok());
    }

    #[test]
    fn keeps_the_source_line_of_each_entry() {
        let list = parse("\n\na.example.com\n\nb.example.com\n").unwrap();
        let lines: Vec<usize> = list.entries().iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 5]);
    }
}

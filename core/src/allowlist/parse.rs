//! Allowlist text → entries. Squid `dstdomain` compatible:
//!
//! - `example.com`   that name only
//! - `.example.com`  example.com and every name below it
//! - `*.example.com` every name below example.com, not example.com itself
//!
//! `#` starts a comment; blank lines are ignored. Anything else that is not
//! a valid host name fails the whole list: a gateway must never run with a
//! list that says something other than what its author meant.

use super::entry::{Entry, EntryKind};
use super::trie::Allowlist;
use crate::name::{HostName, NameError};

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
    /// Refused only where the operator asked for it (`--strict`).
    #[error("{0} (refused: strict)")]
    SharedSuffix(SharedSuffix),
}

/// Parses a whole list. Fails on the first invalid line.
pub fn parse(text: &str) -> Result<Allowlist, ParseError> {
    text.lines()
        .enumerate()
        .filter_map(|(index, raw)| {
            let line = index + 1;
            parse_line(raw, line)
                .map_err(|kind| ParseError { line, kind })
                .transpose()
        })
        .collect()
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

/// The private section of a Public Suffix List file, indexed by every
/// domain above one of its suffixes: what the compiled-in list cannot tell,
/// that `.amazonaws.com` sits above `s3.amazonaws.com` and many more.
#[derive(Debug, Default)]
pub struct PrivateSuffixes {
    /// Domain → (the shortest suffix below it, how many there are).
    above: std::collections::HashMap<String, (String, usize)>,
}

impl PrivateSuffixes {
    /// Where Debian's `publicsuffix` and Amazon Linux's `publicsuffix-list`
    /// packages install the list.
    pub const SYSTEM_PATH: &'static str = "/usr/share/publicsuffix/public_suffix_list.dat";

    /// The rules between the private section's markers, in PSL syntax.
    pub fn parse(text: &str) -> PrivateSuffixes {
        let mut above: std::collections::HashMap<String, (String, usize)> = Default::default();
        let section = text
            .split_once("===BEGIN PRIVATE DOMAINS===")
            .map_or("", |(_, rest)| rest);
        let section = section
            .split_once("===END PRIVATE DOMAINS===")
            .map_or(section, |(inside, _)| inside);
        for rule in section.lines().map(str::trim) {
            if rule.is_empty() || rule.starts_with("//") || rule.starts_with('!') {
                continue;
            }
            let Ok(suffix) = HostName::from_config(rule.trim_start_matches("*.")) else {
                continue;
            };
            let suffix = suffix.as_str();
            let mut rest = suffix;
            while let Some((_, parent)) = rest.split_once('.') {
                let slot = above
                    .entry(parent.to_string())
                    .or_insert_with(|| (suffix.to_string(), 0));
                slot.1 += 1;
                if suffix.len() < slot.0.len() {
                    slot.0 = suffix.to_string();
                }
                rest = parent;
            }
        }
        PrivateSuffixes { above }
    }

    /// The system's list, or none where it is not installed.
    pub fn system() -> PrivateSuffixes {
        std::fs::read_to_string(Self::SYSTEM_PATH)
            .map(|text| PrivateSuffixes::parse(&text))
            .unwrap_or_default()
    }
}

/// An entry that covers a shared public suffix: a suffix of the Public
/// Suffix List's private section, under which anyone can create a name of
/// their own (a bucket under `s3.amazonaws.com`, a site under `github.io`).
/// Through such an entry, data can reach an attacker's own bucket with a
/// valid name and a valid address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSuffix {
    pub line: usize,
    /// The entry as written (normalised).
    pub entry: String,
    /// The shared suffix it covers (the shortest, if several).
    pub suffix: String,
    /// How many other shared suffixes it covers.
    pub more: usize,
}

impl std::fmt::Display for SharedSuffix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let more = match self.more {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        write!(
            f,
            "{:?} covers {}{more}, a shared public suffix (Public Suffix List, private section): anyone can create a name under it and reach it through this entry; list the hosts you use instead (e.g. my-bucket.{})",
            self.entry, self.suffix, self.suffix
        )
    }
}

/// The entry's shared suffix, if it covers one: a wildcard entry whose
/// domain is a private-section suffix, is directly above a wildcard rule
/// (`*.D`), or (by `known`) is above any private-section suffix. An exact
/// entry names one host, which nobody can create, so it covers none.
pub fn shared_suffix(entry: &Entry, known: &PrivateSuffixes) -> Option<SharedSuffix> {
    if entry.kind == EntryKind::Exact {
        return None;
    }
    let name = entry.name.as_str();
    let shared = |suffix: String, more: usize| SharedSuffix {
        line: entry.line,
        entry: entry.to_string(),
        suffix,
        more,
    };
    // A made-up label below the entry: the longest rule that matches it is
    // the suffix that names under the entry are registered below.
    let probe = format!("portcullis-probe.{name}");
    if let Some(suffix) = psl::suffix(probe.as_bytes())
        && suffix.typ() == Some(psl::Type::Private)
        && let Ok(suffix) = std::str::from_utf8(suffix.as_bytes())
        && (suffix == name || suffix.ends_with(&format!(".{name}")))
    {
        let more = known.above.get(name).map_or(0, |(_, n)| *n);
        return Some(shared(name.to_string(), more));
    }
    let (shortest, count) = known.above.get(name)?;
    Some(shared(shortest.clone(), count - 1))
}

/// Every entry of `list` that covers a shared suffix, in list order.
pub fn shared_suffixes(list: &Allowlist, known: &PrivateSuffixes) -> Vec<SharedSuffix> {
    list.entries()
        .iter()
        .filter_map(|e| shared_suffix(e, known))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_above_a_shared_suffix_are_found_with_the_lists_private_section() {
        let psl = "// ===BEGIN ICANN DOMAINS===\ncom\n// ===END ICANN DOMAINS===\n\
                   // ===BEGIN PRIVATE DOMAINS===\n// Amazon\ns3.amazonaws.com\n\
                   *.compute.amazonaws.com\ns3.dualstack.eu-west-1.amazonaws.com\n\
                   !www.ck\n// ===END PRIVATE DOMAINS===\n";
        let known = PrivateSuffixes::parse(psl);
        let list = parse(".amazonaws.com\n*.eu-west-1.amazonaws.com\namazonaws.com\n").unwrap();
        let found = shared_suffixes(&list, &known);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            (found[0].line, found[0].suffix.as_str(), found[0].more),
            (1, "s3.amazonaws.com", 2)
        );
        assert!(
            found[0]
                .to_string()
                .contains("covers s3.amazonaws.com and 2 more")
        );
        assert_eq!(
            (found[1].line, found[1].suffix.as_str(), found[1].more),
            (2, "s3.dualstack.eu-west-1.amazonaws.com", 0)
        );
        // Where the system has the list, the shipped example's entries are
        // checked against all of it.
        let system = PrivateSuffixes::system();
        if !system.above.is_empty() {
            let example = parse(".amazonaws.com\n").unwrap();
            assert_eq!(shared_suffixes(&example, &system).len(), 1);
        }
    }

    #[test]
    fn entries_that_cover_names_anyone_can_create_are_found() {
        let list = parse(concat!(
            ".s3.amazonaws.com\n",
            "*.cloudfront.net\n",
            ".github.io\n",
            ".herokuapp.com\n",
            "my-bucket.s3.amazonaws.com\n",
            ".my-bucket.s3.amazonaws.com\n",
            "s3.amazonaws.com\n",
            ".example.com\n",
            "d111111abcdef8.cloudfront.net\n",
            ".org.github.io\n",
        ))
        .unwrap();
        let none = PrivateSuffixes::default();
        let found: Vec<(usize, String, String)> = shared_suffixes(&list, &none)
            .into_iter()
            .map(|s| (s.line, s.entry, s.suffix))
            .collect();
        assert_eq!(
            found,
            [
                (1, ".s3.amazonaws.com".into(), "s3.amazonaws.com".into()),
                (2, "*.cloudfront.net".into(), "cloudfront.net".into()),
                (3, ".github.io".into(), "github.io".into()),
                (4, ".herokuapp.com".into(), "herokuapp.com".into()),
            ]
        );
        let warning = shared_suffixes(&list, &none)[0].to_string();
        assert!(
            warning.starts_with(
                "\".s3.amazonaws.com\" covers s3.amazonaws.com, a shared public suffix"
            ) && warning.contains("my-bucket.s3.amazonaws.com"),
            "{warning}"
        );
    }

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

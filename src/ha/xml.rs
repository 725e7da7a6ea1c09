//! A small element tree over `xmlparser`'s tokens: enough for the EC2
//! API's responses, which are plain nested elements with text leaves.
//! Bounded in depth and size; never panics on any input.

use std::fmt::Write as _;

const MAX_DEPTH: usize = 64;
const MAX_ELEMENTS: usize = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML: {0}")]
    Syntax(String),
    #[error("XML nested deeper than {MAX_DEPTH} or larger than {MAX_ELEMENTS} elements")]
    TooLarge,
    #[error("XML document has no root element")]
    Empty,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the element at `path` below this one.
    pub fn text_at(&self, path: &[&str]) -> Option<&str> {
        let mut at = self;
        for name in path {
            at = at.child(name)?;
        }
        Some(at.text.as_str())
    }

    /// The `item`s of the list element `name`, as EC2 writes lists.
    pub fn items<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Element> + 'a {
        self.child(name)
            .into_iter()
            .flat_map(|list| list.children("item"))
    }
}

pub fn parse(doc: &str) -> Result<Element, XmlError> {
    use xmlparser::{ElementEnd, Token};
    let mut stack: Vec<Element> = Vec::new();
    let mut count = 0usize;
    for token in xmlparser::Tokenizer::from(doc) {
        let token = token.map_err(|e| XmlError::Syntax(e.to_string()))?;
        match token {
            Token::ElementStart { local, .. } => {
                count += 1;
                if stack.len() >= MAX_DEPTH || count > MAX_ELEMENTS {
                    return Err(XmlError::TooLarge);
                }
                stack.push(Element {
                    name: local.as_str().to_owned(),
                    ..Element::default()
                });
            }
            Token::ElementEnd { end, .. } => match end {
                ElementEnd::Open => {}
                ElementEnd::Empty | ElementEnd::Close(..) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| XmlError::Syntax("unbalanced close tag".into()))?;
                    if let ElementEnd::Close(_, local) = end
                        && local.as_str() != done.name
                    {
                        return Err(XmlError::Syntax(format!(
                            "<{}> closed by </{}>",
                            done.name,
                            local.as_str()
                        )));
                    }
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Ok(done),
                    }
                }
            },
            Token::Text { text } => {
                if let Some(open) = stack.last_mut() {
                    unescape_into(text.as_str(), &mut open.text)?;
                }
            }
            Token::Cdata { text, .. } => {
                if let Some(open) = stack.last_mut() {
                    open.text.push_str(text.as_str());
                }
            }
            _ => {}
        }
    }
    Err(if stack.is_empty() {
        XmlError::Empty
    } else {
        XmlError::Syntax("document ends inside an element".into())
    })
}

/// The five predefined entities and character references.
fn unescape_into(text: &str, out: &mut String) -> Result<(), XmlError> {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .ok_or_else(|| XmlError::Syntax("unterminated entity".into()))?;
        let entity = &after[..semi];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
            }
        };
        match ch {
            Some(c) => out.push(c),
            None => {
                let mut msg = String::new();
                let _ = write!(msg, "unknown entity &{entity};");
                return Err(XmlError::Syntax(msg));
            }
        }
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_lists_and_unescapes_text() {
        let doc = r#"<?xml version="1.0" encoding="UTF-8"?>
            <R xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
              <tagSet><item><key>a&amp;b</key><value>&#x41;&#66;&lt;</value></item><item/></tagSet>
              <empty/>
            </R>"#;
        let root = parse(doc).expect("parses");
        assert_eq!(root.name, "R");
        let items: Vec<_> = root.items("tagSet").collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].text_at(&["key"]), Some("a&b"));
        assert_eq!(items[0].text_at(&["value"]), Some("AB<"));
        assert_eq!(root.text_at(&["empty"]), Some(""));
        assert_eq!(root.text_at(&["missing"]), None);
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for doc in [
            "",
            "<",
            "<a>",
            "<a></b>",
            "<a>&bogus;</a>",
            "<a>&#xD800;</a>",
            "<a>&amp</a>",
            "text",
        ] {
            assert!(parse(doc).is_err(), "{doc:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(XmlError::TooLarge));
    }
}

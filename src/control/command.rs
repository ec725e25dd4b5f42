//! The grammar of `<mount>/.optbin/control`: one command per write.
//!
//! ```text
//! command := verb SP name [SP target] [LF]
//! verb    := "pin" | "unpin" | "exclude" | "include" | "optimize" | "reset"
//! target  := "original" | "bolted"          (only and always after `pin`)
//! name    := a PATH-view name ("node") or an absolute path ("/usr/bin/node")
//! SP      := exactly one U+0020; LF := one U+000A, only at the very end
//! ```
//! Strict on purpose: no other whitespace, no control characters, no `.` or `..` as a name
//! or a path component. Parsing is pure; resolving the name ([`super::resolve`]) and
//! carrying the command out is the daemon's.

use std::fmt;

use crate::policy::Pin;

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Always serve this binary's original (or its optimized variant, when there is one).
    Pin { name: String, target: Pin },
    /// Let the policy choose again.
    Unpin { name: String },
    /// Never profile, optimize or serve a variant of this binary: it reaches users as a
    /// symlink to the original.
    Exclude { name: String },
    /// Undo `exclude`.
    Include { name: String },
    /// Build a variant now with the profile collected so far.
    Optimize { name: String },
    /// Forget profile, variants and measurements of this binary.
    Reset { name: String },
    /// Run this binary's training commands now.
    Train { name: String },
}

impl Command {
    pub fn name(&self) -> &str {
        match self {
            Self::Pin { name, .. }
            | Self::Unpin { name }
            | Self::Exclude { name }
            | Self::Include { name }
            | Self::Optimize { name }
            | Self::Reset { name }
            | Self::Train { name } => name,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pin { name, target } => write!(f, "pin {name} {}", target.as_str()),
            Self::Unpin { name } => write!(f, "unpin {name}"),
            Self::Exclude { name } => write!(f, "exclude {name}"),
            Self::Include { name } => write!(f, "include {name}"),
            Self::Optimize { name } => write!(f, "optimize {name}"),
            Self::Reset { name } => write!(f, "reset {name}"),
            Self::Train { name } => write!(f, "train {name}"),
        }
    }
}

/// Why a write was not a command. The message is what `last_error` shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

pub const USAGE: &str = "pin NAME original|bolted | unpin NAME | exclude NAME | include NAME | \
                         optimize NAME | reset NAME | train NAME";

/// Parses the bytes of one write.
pub fn parse(bytes: &[u8]) -> Result<Command, ParseError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ParseError("the command is not UTF-8 text".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Err(ParseError(format!("empty command; expected one of: {USAGE}")));
    }
    if text.contains('\n') {
        return Err(ParseError("one command per write: the text holds several lines".into()));
    }
    if let Some(c) = text.chars().find(|c| c.is_control() || (c.is_whitespace() && *c != ' ')) {
        return Err(ParseError(format!(
            "unexpected character U+{:04X} (words are separated by one space, \
             lines end with one \\n)",
            c as u32
        )));
    }
    let words: Vec<&str> = text.split(' ').collect();
    if words.iter().any(|w| w.is_empty()) {
        return Err(ParseError(
            "words are separated by exactly one space, with none before or after".into(),
        ));
    }
    let (&verb, args) = words.split_first().expect("split yields at least one word");
    let one_name = |verb: &str| -> Result<String, ParseError> {
        match args {
            [name] => checked_name(name),
            [] => Err(ParseError(format!("`{verb}` needs a NAME"))),
            _ => Err(ParseError(format!("`{verb}` takes one NAME, got {} words", args.len()))),
        }
    };
    match verb {
        "pin" => match args {
            [name, target] => {
                let name = checked_name(name)?;
                let target = Pin::parse(target).ok_or_else(|| {
                    ParseError(format!(
                        "`pin` target must be `original` or `bolted`, got {target:?}"
                    ))
                })?;
                Ok(Command::Pin { name, target })
            }
            _ => Err(ParseError("`pin` takes NAME and `original` or `bolted`".into())),
        },
        "unpin" => Ok(Command::Unpin { name: one_name(verb)? }),
        "exclude" => Ok(Command::Exclude { name: one_name(verb)? }),
        "include" => Ok(Command::Include { name: one_name(verb)? }),
        "optimize" => Ok(Command::Optimize { name: one_name(verb)? }),
        "reset" => Ok(Command::Reset { name: one_name(verb)? }),
        "train" => Ok(Command::Train { name: one_name(verb)? }),
        other => Err(ParseError(format!("unknown command {other:?}; expected one of: {USAGE}"))),
    }
}

/// A NAME as the grammar allows it: a bare name, or an absolute path without `.` or `..`
/// components (a relative path with a `/` is refused by the resolver).
fn checked_name(name: &str) -> Result<String, ParseError> {
    if name.split('/').any(|part| part == "." || part == "..") {
        return Err(ParseError(format!("{name:?} names no binary: `.` and `..` are not allowed")));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_verb() {
        assert_eq!(
            parse(b"pin node original\n").unwrap(),
            Command::Pin { name: "node".into(), target: Pin::Original }
        );
        assert_eq!(
            parse(b"pin /usr/bin/node bolted").unwrap(),
            Command::Pin { name: "/usr/bin/node".into(), target: Pin::Bolted }
        );
        assert_eq!(parse(b"unpin node").unwrap(), Command::Unpin { name: "node".into() });
        assert_eq!(parse(b"exclude node\n").unwrap(), Command::Exclude { name: "node".into() });
        assert_eq!(parse(b"include node").unwrap(), Command::Include { name: "node".into() });
        assert_eq!(parse(b"optimize lua").unwrap(), Command::Optimize { name: "lua".into() });
        assert_eq!(parse(b"reset lua\n").unwrap(), Command::Reset { name: "lua".into() });
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "pin a original",
            "pin a bolted",
            "unpin a",
            "exclude a",
            "include a",
            "optimize a",
            "reset a",
            "train a",
        ] {
            assert_eq!(parse(text.as_bytes()).unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_commands_with_a_reason() {
        for (input, needle) in [
            (&b""[..], "empty command"),
            (b"\n", "empty command"),
            (b"frobnicate x", "unknown command"),
            (b"pin node", "`pin` takes"),
            (b"pin node fast", "must be `original` or `bolted`"),
            (b"exclude", "needs a NAME"),
            (b"exclude a b", "takes one NAME"),
            (b"exclude a\ninclude a\n", "one command per write"),
            (b"\xff\xfe", "not UTF-8"),
            (b"exclude .", "`.` and `..` are not allowed"),
            (b"exclude ..", "`.` and `..` are not allowed"),
            (b"pin .. bolted", "`.` and `..` are not allowed"),
            (b"exclude /usr/bin/../bin/x", "`.` and `..` are not allowed"),
            (b"exclude /usr/./bin/x", "`.` and `..` are not allowed"),
            (b" exclude node", "exactly one space"),
            (b"exclude  node", "exactly one space"),
            (b"exclude node ", "exactly one space"),
            ("exclude\u{a0}node".as_bytes(), "U+00A0"),
            (b"exclude\tnode", "U+0009"),
            (b"exclude node\r\n", "U+000D"),
            (b"exclude node\r\r\n", "U+000D"),
            (b"exclude node\n\n", "several lines"),
            (b"exclude n\x00de", "U+0000"),
        ] {
            let err = parse(input).unwrap_err();
            assert!(err.0.contains(needle), "{input:?}: {err}");
        }
    }
}

//! GBNF, the grammar format of llama.cpp (llama-server's `grammar` request field), read and
//! rewritten as the Lark grammar llguidance compiles ([`crate::grammar`]), so a GBNF grammar
//! constrains decoding on the same engine as JSON schemas and tool calls.
//!
//! The GBNF this reads (llama.cpp's `grammars/README.md`): rules `name ::= alternatives`
//! (names of letters, digits and `-`; `root` is where the output starts), alternatives
//! separated by `|`, sequences of string literals (`"..."` with `\n`, `\r`, `\t`, `\\`, `\"`,
//! `\xHH`, `\uHHHH`, `\UHHHHHHHH` escapes), character classes (`[a-z0-9_]`, `[^"\\]`, same
//! escapes), `.` (any character), rule references and groups `( ... )`, each followed by at most
//! one of `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`; `#` comments. A rule may span lines. Token
//! references match one token of the model's vocabulary: by id, `<[1000]>` (any token but it:
//! `!<[1000]>`), or by text, `<think>`, which must be one of the model's special tokens (added
//! tokens such as `<|im_end|>` or `<think>`; another text is refused by name when the grammar is
//! compiled against the model's tokenizer; to exclude one, `!<[ID]>` with its id). Undefined
//! rules and a grammar without `root` are refused.
//!
//! The rewrite is one to one: each GBNF rule becomes a Lark rule (`foo-Bar` -> `g-foo-_bar`,
//! since Lark rule names are lower case), literals become JSON-escaped strings and classes
//! become one-character regular expressions written with `\x{...}` escapes.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Why a GBNF grammar was refused: what is wrong and where (line and column, from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (line {line}, column {column})")]
pub struct GbnfError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

/// A GBNF grammar as Lark text for llguidance (`start: <root>` first).
pub fn to_lark(src: &str) -> Result<String, GbnfError> {
    let mut p = Parser {
        src,
        chars: src.char_indices().collect(),
        pos: 0,
    };
    let mut out = String::new();
    let mut defined = BTreeSet::new();
    let mut used = Vec::new();
    p.skip_space();
    while !p.at_end() {
        let at = p.pos;
        let name = p
            .name()
            .ok_or_else(|| p.error_at(at, "expected a rule name"))?;
        p.skip_space();
        if !p.eat_str("::=") {
            return Err(p.error("expected `::=` after the rule name"));
        }
        if !defined.insert(name.clone()) {
            return Err(p.error_at(at, format!("rule `{name}` is defined twice")));
        }
        let body = p.alternatives(0, &mut used)?;
        let _ = writeln!(out, "{}: {body}", lark_name(&name));
    }
    if !defined.contains("root") {
        return Err(GbnfError {
            message: "the grammar has no `root` rule (where the output starts)".into(),
            line: 1,
            column: 1,
        });
    }
    if let Some((name, at)) = used.iter().find(|(n, _)| !defined.contains(n)) {
        return Err(p.error_at(*at, format!("rule `{name}` is used but not defined")));
    }
    Ok(format!("start: {}\n{out}", lark_name("root")))
}

/// `foo-Bar9` -> `g-foo-_bar9`: lower case, an upper-case letter as `_` and the letter (GBNF
/// names have no `_`, so distinct names stay distinct).
fn lark_name(name: &str) -> String {
    let mut s = String::from("g-");
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

/// `c` inside a Lark (JSON-syntax) string literal.
fn push_string_char(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        c if (c as u32) < 0x20 || c == '\u{7f}' => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => out.push(c),
    }
}

/// `c` inside a regular-expression character class: letters and digits as they are, all else
/// as `\x{..}`, so no character means anything to the class or to Lark's `/.../`.
fn push_class_char(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        let _ = write!(out, "\\x{{{:x}}}", c as u32);
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

struct Parser<'a> {
    src: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|&(_, c)| c)
    }

    fn peek_at(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).map(|&(_, c)| c)
    }

    fn error_at(&self, pos: usize, message: impl Into<String>) -> GbnfError {
        let byte = self.chars.get(pos).map_or(self.src.len(), |&(b, _)| b);
        let before = &self.src[..byte];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        GbnfError {
            message: message.into(),
            line,
            column,
        }
    }

    fn error(&self, message: impl Into<String>) -> GbnfError {
        self.error_at(self.pos, message)
    }

    /// Spaces, newlines and `#` comments.
    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.pos += 1;
            } else if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if s.chars()
            .enumerate()
            .all(|(i, c)| self.peek_at(i) == Some(c))
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(is_name_char) {
            self.pos += 1;
        }
        (self.pos > start).then(|| {
            self.chars[start..self.pos]
                .iter()
                .map(|&(_, c)| c)
                .collect()
        })
    }

    /// Whether a new rule (`name ::=`) starts here: the end of the current rule's body.
    fn at_rule_start(&self) -> bool {
        let mut k = 0;
        while self.peek_at(k).is_some_and(is_name_char) {
            k += 1;
        }
        if k == 0 {
            return false;
        }
        while self.peek_at(k).is_some_and(|c| c == ' ' || c == '\t') {
            k += 1;
        }
        (0..3).all(|i| self.peek_at(k + i) == Some([':', ':', '='][i]))
    }

    /// `seq ( "|" seq )*`, up to the end of the rule (depth 0) or the closing `)`.
    fn alternatives(
        &mut self,
        depth: usize,
        used: &mut Vec<(String, usize)>,
    ) -> Result<String, GbnfError> {
        let mut alts = vec![self.sequence(depth, used)?];
        while self.eat('|') {
            alts.push(self.sequence(depth, used)?);
        }
        Ok(alts.join(" | "))
    }

    fn sequence(
        &mut self,
        depth: usize,
        used: &mut Vec<(String, usize)>,
    ) -> Result<String, GbnfError> {
        let mut items: Vec<String> = Vec::new();
        loop {
            self.skip_space();
            match self.peek() {
                None => break,
                Some('|') => break,
                Some(')') if depth > 0 => break,
                Some(')') => return Err(self.error("unmatched `)`")),
                _ if depth == 0 && self.at_rule_start() => break,
                _ => {}
            }
            let atom = self.atom(depth, used)?;
            if let Some(item) = self.repetition(atom)? {
                items.push(item);
            }
        }
        if depth > 0 && self.peek().is_none() {
            return Err(self.error("missing `)`"));
        }
        Ok(if items.is_empty() {
            "\"\"".into()
        } else {
            items.join(" ")
        })
    }

    fn atom(&mut self, depth: usize, used: &mut Vec<(String, usize)>) -> Result<String, GbnfError> {
        let at = self.pos;
        match self.peek() {
            Some('"') => {
                self.pos += 1;
                let mut s = String::from("\"");
                loop {
                    match self.peek() {
                        None | Some('\n') => return Err(self.error_at(at, "unterminated string")),
                        Some('"') => {
                            self.pos += 1;
                            break;
                        }
                        Some(_) => {
                            let c = self.char_in_literal()?;
                            push_string_char(&mut s, c);
                        }
                    }
                }
                s.push('"');
                // An empty literal matches nothing: as GBNF, an empty sequence.
                Ok(s)
            }
            Some('[') => {
                self.pos += 1;
                let mut class = String::from("/[");
                if self.eat('^') {
                    class.push('^');
                }
                let mut any = false;
                loop {
                    match self.peek() {
                        None => return Err(self.error_at(at, "unterminated character class")),
                        Some(']') => {
                            self.pos += 1;
                            break;
                        }
                        Some(_) => {
                            let lo = self.char_in_literal()?;
                            push_class_char(&mut class, lo);
                            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']')
                            {
                                self.pos += 1;
                                let hi = self.char_in_literal()?;
                                if hi < lo {
                                    return Err(self.error_at(
                                        at,
                                        format!("character range {lo:?}-{hi:?} is backwards"),
                                    ));
                                }
                                class.push('-');
                                push_class_char(&mut class, hi);
                            }
                            any = true;
                        }
                    }
                }
                if !any {
                    return Err(self.error_at(at, "empty character class"));
                }
                class.push_str("]/");
                Ok(class)
            }
            Some('.') => {
                self.pos += 1;
                Ok("/(?s:.)/".into())
            }
            Some('(') => {
                self.pos += 1;
                let inner = self.alternatives(depth + 1, used)?;
                if !self.eat(')') {
                    return Err(self.error_at(at, "missing `)`"));
                }
                Ok(format!("({inner})"))
            }
            Some('<') => self.token_ref(false),
            Some('!') if self.peek_at(1) == Some('<') => {
                self.pos += 1;
                self.token_ref(true)
            }
            Some(c) if is_name_char(c) => {
                let name = self.name().unwrap_or_default();
                used.push((name.clone(), at));
                Ok(lark_name(&name))
            }
            Some(c) => Err(self.error(format!("unexpected {c:?}"))),
            None => Err(self.error("unexpected end of grammar")),
        }
    }

    /// A token reference at `<` (after a `!` when `negate`): `<[ID]>` or `<TEXT>`, as Lark's
    /// `<[ID]>`, `<[^ID]>` or `<TEXT>`.
    fn token_ref(&mut self, negate: bool) -> Result<String, GbnfError> {
        let at = self.pos;
        self.pos += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                Some('>') => {
                    self.pos += 1;
                    break;
                }
                Some(c) if c != '<' && !c.is_whitespace() => {
                    text.push(c);
                    self.pos += 1;
                }
                _ => return Err(self.error_at(at, "token reference without its closing `>`")),
            }
        }
        if text.is_empty() {
            return Err(self.error_at(at, "empty token reference `<>`"));
        }
        if let Some(id) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let id: u32 = id.parse().map_err(|_| {
                self.error_at(at, format!("token id `{id}` is not a number (`<[1000]>`)"))
            })?;
            return Ok(format!("<[{}{id}]>", if negate { "^" } else { "" }));
        }
        if negate {
            return Err(self.error_at(
                at,
                format!("`!<{text}>`: exclude a token by its id (`!<[ID]>`), not by its text"),
            ));
        }
        Ok(format!("<{text}>"))
    }

    /// One character of a literal or class, escapes decoded.
    fn char_in_literal(&mut self) -> Result<char, GbnfError> {
        let at = self.pos;
        let Some(c) = self.peek() else {
            return Err(self.error("unexpected end of grammar"));
        };
        self.pos += 1;
        if c != '\\' {
            return Ok(c);
        }
        let Some(e) = self.peek() else {
            return Err(self.error("unexpected end of grammar after `\\`"));
        };
        self.pos += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char, GbnfError> {
            let digits: String = (0..n).filter_map(|i| p.peek_at(i)).collect();
            let v = (digits.len() == n)
                .then(|| u32::from_str_radix(&digits, 16).ok())
                .flatten()
                .and_then(char::from_u32)
                .ok_or_else(|| p.error_at(at, format!("bad escape `\\{e}{digits}`")))?;
            p.pos += n;
            Ok(v)
        };
        match e {
            'n' => Ok('\n'),
            'r' => Ok('\r'),
            't' => Ok('\t'),
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' => Ok(e),
            'x' => hex(self, 2),
            'u' => hex(self, 4),
            'U' => hex(self, 8),
            other => Err(self.error_at(at, format!("unknown escape `\\{other}`"))),
        }
    }

    /// The postfix operator after `atom`, if any; `None` when it repeats zero times.
    fn repetition(&mut self, atom: String) -> Result<Option<String>, GbnfError> {
        let at = self.pos;
        match self.peek() {
            Some(op @ ('*' | '+' | '?')) => {
                self.pos += 1;
                Ok(Some(format!("{atom}{op}")))
            }
            Some('{') => {
                self.pos += 1;
                let number = |p: &mut Self| -> Option<u32> {
                    p.skip_space();
                    let start = p.pos;
                    while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                        p.pos += 1;
                    }
                    let s: String = p.chars[start..p.pos].iter().map(|&(_, c)| c).collect();
                    s.parse().ok()
                };
                let min = number(self).ok_or_else(|| self.error("expected a number after `{`"))?;
                self.skip_space();
                let max = if self.eat(',') {
                    number(self)
                } else {
                    Some(min)
                };
                self.skip_space();
                if !self.eat('}') {
                    return Err(self.error_at(at, "expected `}` to close the repetition"));
                }
                match max {
                    Some(0) => Ok(None),
                    Some(m) if m < min => Err(self.error_at(
                        at,
                        format!("repetition {{{min},{m}}}: the maximum is below the minimum"),
                    )),
                    Some(m) if m == min => Ok(Some(format!("{atom}{{{min}}}"))),
                    Some(m) => Ok(Some(format!("{atom}{{{min},{m}}}"))),
                    None => Ok(Some(format!("{atom}{{{min},}}"))),
                }
            }
            _ => Ok(Some(atom)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rules_literals_classes_and_repetitions_become_lark() {
        let g = r#"
# yes or no, then digits
root   ::= answer " " num{1,3}
answer ::= "yes" | "no" |
   "maybe\n"
num ::= [0-9] ([^"\\] | .)* [a-zA-Z_-]?
"#;
        let lark = to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: g-root\n\
             g-root: g-answer \" \" g-num{1,3}\n\
             g-answer: \"yes\" | \"no\" | \"maybe\\u000a\"\n\
             g-num: /[0-9]/ (/[^\\x{22}\\x{5c}]/ | /(?s:.)/)* /[a-zA-Z\\x{5f}\\x{2d}]/?\n"
        );
    }

    /// llama.cpp's own `grammars/json.gbnf` (an empty alternative, escapes in classes,
    /// `{m,n}`, rules over several lines, comments) compiles in llguidance for a real
    /// tokenizer.
    #[test]
    fn llama_cpp_json_grammar_compiles() {
        let json_gbnf = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;
        let lark = to_lark(json_gbnf).unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny/smollm2");
        let files = plexus_model::ModelFiles::open(&dir).unwrap();
        let tokenizer = std::sync::Arc::new(files.tokenizer().unwrap());
        let grammars = crate::grammar::Grammars::default();
        let compiled = grammars.compile(
            "tiny",
            &tokenizer,
            llguidance::api::TopLevelGrammar::from_lark(lark.clone()),
            "grammar",
        );
        if let Err(e) = compiled {
            panic!("{}\n{lark}", e.body());
        }
    }

    fn compile(lark: String) -> Result<plexus_model::constraint::SharedGrammar, String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny/smollm2");
        let files = plexus_model::ModelFiles::open(&dir).unwrap();
        let tokenizer = std::sync::Arc::new(files.tokenizer().unwrap());
        crate::grammar::Grammars::default()
            .compile(
                "tiny",
                &tokenizer,
                llguidance::api::TopLevelGrammar::from_lark(lark),
                "grammar",
            )
            .map_err(|e| e.body().to_string())
    }

    fn allowed(mask: &[u32], token: u32) -> bool {
        mask[(token / 32) as usize] >> (token % 32) & 1 == 1
    }

    /// The masks say what the references mean: `!<[5]>` allows every token but 5, `<[2]>`
    /// only token 2.
    #[test]
    fn token_references_mask_exactly_the_tokens_they_name() {
        let grammar = compile(to_lark("root ::= !<[5]> <[2]>").unwrap()).unwrap();
        let mut c = grammar.start();
        let first = c.mask().unwrap();
        assert!(!allowed(&first, 5));
        assert!(allowed(&first, 6) && allowed(&first, 40));
        c.advance(6).unwrap();
        let second = c.mask().unwrap();
        assert!(allowed(&second, 2));
        let count: u32 = second.iter().map(|w| w.count_ones()).sum();
        assert_eq!(count, 1);
    }

    #[test]
    fn token_references_by_id_and_by_special_text_compile_and_unknown_text_is_refused() {
        let lark = to_lark("root ::= <|im_start|> \"a\" !<[5]>* <[2]>").unwrap();
        assert!(
            lark.contains("<|im_start|>") && lark.contains("<[^5]>") && lark.contains("<[2]>"),
            "{lark}"
        );
        if let Err(e) = compile(lark.clone()) {
            panic!("{e}\n{lark}");
        }
        let Err(e) = compile(to_lark("root ::= <not-a-token>").unwrap()) else {
            panic!("an unknown token compiled");
        };
        assert!(e.contains("<not-a-token>"), "{e}");
    }

    #[test]
    fn names_keep_their_case_apart() {
        let lark = to_lark("root ::= Ab ab\nAb ::= \"x\"\nab ::= \"y\"").unwrap();
        assert!(
            lark.contains("g-_ab: \"x\"") && lark.contains("g-ab: \"y\""),
            "{lark}"
        );
    }

    #[test]
    fn bad_grammars_say_what_and_where() {
        for (g, needle, line) in [
            ("rot ::= \"a\"", "no `root` rule", 1),
            ("root ::= \"a\" b", "rule `b` is used but not defined", 1),
            ("root ::= \"a\nb\"", "unterminated string", 1),
            ("root ::= [a-z", "unterminated character class", 1),
            ("root ::= (\"a\"", "missing `)`", 1),
            ("root ::= \"a\"\nroot ::= \"b\"", "defined twice", 2),
            ("root ::= \"\\q\"", "unknown escape", 1),
            ("root ::= \"a\"{3,1}", "below the minimum", 1),
            ("root ::= <[12x]>", "token id `12x` is not a number", 1),
            ("root ::= \"a\"\n  !<think>", "exclude a token by its id", 2),
            ("root ::= <think", "without its closing `>`", 1),
            ("root ::= <>", "empty token reference", 1),
            ("root = \"a\"", "expected `::=`", 1),
            ("root ::= [z-a]", "backwards", 1),
        ] {
            let e = to_lark(g).unwrap_err();
            assert!(e.message.contains(needle), "{g:?}: {e}");
            assert_eq!(e.line, line, "{g:?}: {e}");
        }
    }
}

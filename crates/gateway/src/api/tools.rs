//! Tool calling: `tools`, `tool_choice` (`"auto"`, `"none"`, `"required"`, a named function),
//! `parallel_tool_calls`.
//!
//! - The prompt: a chat template that mentions `tools` (Qwen2.5, Llama 3.1, Hermes) renders
//!   the tools and the conversation's tool calls and results itself. Otherwise (SmolLM2's
//!   template has no tools) Plexus writes them in the Hermes/Qwen2.5 format, documented in
//!   docs/api-parameters.md: a `# Tools` block in the system message listing each tool as JSON
//!   inside `<tools></tools>`, assistant tool calls as `<tool_call>` blocks, tool results as a
//!   user turn of `<tool_response>` blocks.
//! - The answer: every call is `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`,
//!   calls separated by a newline, generated under a grammar ([`Tools::grammar`]) in which ARGS
//!   is the function's JSON schema, so the arguments always validate. `"required"` and a named
//!   function allow only calls; `"auto"` allows calls or text that does not start with `<`;
//!   `"none"` leaves the tools out of the prompt and allows only such text. Without
//!   `parallel_tool_calls` (default true) exactly one call.
//! - [`CallStream`] turns the generated text into OpenAI's `tool_calls`, incrementally, so a
//!   stream carries the name first and then `function.arguments` in pieces.

use super::content::bad;
use super::format::valid_name;
use super::generation::GrammarRequest;
use crate::error::ApiError;
use crate::grammar::json_options;
use llguidance::api::TopLevelGrammar;
use plexus_model::chat::Message;
use serde_json::{json, Value};

/// One function the model may call.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (an object).
    pub parameters: Value,
    /// The tool as the request gave it (`{"type": "function", "function": {...}}`), for the
    /// prompt.
    pub spec: Value,
}

/// What `tool_choice` allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools of a request.
#[derive(Clone, Debug)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

/// Parses `tools`, `tool_choice` and `parallel_tool_calls` (`None`: no tools).
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<Tools>, ApiError> {
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                format!("`parallel_tool_calls` must be a boolean, got {other}"),
                "parallel_tool_calls",
            ))
        }
    };
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(bad(
                format!("`tools` must be an array of functions, got {other}"),
                "tools",
            ))
        }
    };
    for (i, t) in list.iter().enumerate() {
        if list[..i].iter().any(|u| u.name == t.name) {
            return Err(bad(
                format!("two tools are named `{}`", t.name),
                format!("tools[{i}].function.name"),
            ));
        }
    }
    let choice = match choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(bad(
                    format!(
                        "unsupported `tool_choice` {other:?}: use \"none\", \"auto\", \
                         \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                    "tool_choice",
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").is_some_and(|t| t == "function"))
                .ok_or_else(|| {
                    bad(
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \
                         \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice",
                    )
                })?;
            if !list.iter().any(|t| t.name == name) {
                return Err(bad(
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                    "tool_choice",
                ));
            }
            Choice::Named(name.to_owned())
        }
    };
    if list.is_empty() {
        if matches!(choice, Choice::Required | Choice::Named(_)) {
            return Err(bad("`tool_choice` needs `tools`", "tool_choice"));
        }
        return Ok(None);
    }
    Ok(Some(Tools {
        tools: list,
        choice,
        parallel,
    }))
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    let at = |k: &str| format!("tools[{i}]{k}");
    let o = t.as_object().ok_or_else(|| {
        bad(
            "a tool must be {\"type\": \"function\", \"function\": {...}}",
            at(""),
        )
    })?;
    if o.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(
            "only tools of type \"function\" are supported",
            at(".type"),
        ));
    }
    if let Some(k) = o
        .keys()
        .find(|k| !["type", "function"].contains(&k.as_str()))
    {
        return Err(bad(format!("unknown field `{k}`"), at(&format!(".{k}"))));
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("`function` must be an object", at(".function")))?;
    if let Some(k) = f
        .keys()
        .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
    {
        return Err(bad(
            format!("unknown field `{k}`"),
            at(&format!(".function.{k}")),
        ));
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            bad(
                "a function name must be 1 to 64 letters, digits, `_` or `-`",
                at(".function.name"),
            )
        })?;
    if f.get("description")
        .is_some_and(|d| !d.is_null() && !d.is_string())
    {
        return Err(bad(
            "`description` must be a string",
            at(".function.description"),
        ));
    }
    if f.get("strict")
        .is_some_and(|s| !s.is_null() && !s.is_boolean())
    {
        return Err(bad("`strict` must be a boolean", at(".function.strict")));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(p @ Value::Object(_)) => p.clone(),
        Some(other) => {
            return Err(bad(
                format!("`parameters` must be a JSON schema object, got {other}"),
                at(".function.parameters"),
            ))
        }
    };
    Ok(Tool {
        name: name.to_owned(),
        parameters,
        spec: t.clone(),
    })
}

/// The text before a call's name and between its name and its arguments.
const OPEN: &str = "<tool_call>\n{\"name\": \"";
const MID: &str = ", \"arguments\": ";
const CLOSE: &str = "}\n</tool_call>";

/// A text answer: anything that does not start like a call.
const TEXT: &str = "TEXT: /[^<](.|\\n)*/";

/// A Lark string literal (llguidance reads JSON string syntax).
fn lit(s: &str) -> String {
    Value::from(s).to_string()
}

impl Tools {
    /// The tools to put in the prompt (none for `"none"`).
    pub fn in_prompt(&self) -> Vec<Value> {
        if self.choice == Choice::None {
            return Vec::new();
        }
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }

    /// The grammar of the answer: calls, or (`"auto"`, `"none"`) text that does not start
    /// with `<`, so that with `"none"` the model cannot write a call as text either.
    pub fn grammar(&self) -> GrammarRequest {
        let callable: Vec<&Tool> = match &self.choice {
            Choice::None => {
                return GrammarRequest {
                    grammar: TopLevelGrammar::from_lark(format!("start: TEXT\n{TEXT}\n")),
                    param: "tools",
                }
            }
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            Choice::Auto | Choice::Required => self.tools.iter().collect(),
        };
        let mut g = String::new();
        if self.choice == Choice::Auto {
            g.push_str(&format!("start: TEXT | calls\n{TEXT}\n"));
        } else {
            g.push_str("start: calls\n");
        }
        if self.parallel {
            g.push_str("calls: call (\"\\n\" call)*\n");
        } else {
            g.push_str("calls: call\n");
        }
        let alts: Vec<String> = (0..callable.len()).map(|i| format!("call_{i}")).collect();
        g.push_str(&format!("call: {}\n", alts.join(" | ")));
        for (i, t) in callable.iter().enumerate() {
            let mut schema = t.parameters.clone();
            if let Some(o) = schema.as_object_mut() {
                o.insert("x-guidance".into(), json_options());
            }
            g.push_str(&format!(
                "call_{i}: {} args_{i} {}\nargs_{i}: %json {}\n",
                lit(&format!("{OPEN}{}\"{MID}", t.name)),
                lit(CLOSE),
                schema
            ));
        }
        GrammarRequest {
            grammar: TopLevelGrammar::from_lark(g),
            param: "tools",
        }
    }
}

/// `value` as Python's `json.dumps` writes it (`", "` and `": "`), the layout of generated
/// calls.
pub fn dumps(value: &Value) -> String {
    match value {
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(dumps).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A call as the model writes it.
fn call_text(name: &str, arguments: &str) -> String {
    let args = serde_json::from_str::<Value>(arguments)
        .map_or_else(|_| arguments.to_owned(), |v| dumps(&v));
    format!("{OPEN}{name}\"{MID}{args}{CLOSE}")
}

/// The system text that lists `tools` for a template without tool support (Qwen2.5's words).
pub fn system_block(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&dumps(t));
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
         <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// The conversation for a template without tool support: the tools in the system message,
/// assistant tool calls as `<tool_call>` text, tool results as user turns of
/// `<tool_response>` blocks (consecutive results in one turn).
pub fn plain_messages(messages: Vec<Message>, tools: &[Value]) -> Vec<Message> {
    let mut out = messages;
    if !tools.is_empty() {
        let block = system_block(tools);
        match out.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{block}", m.content),
            _ => out.insert(0, Message::new("system", block)),
        }
    }
    let mut merged: Vec<Message> = Vec::with_capacity(out.len());
    let mut last_was_tool = false;
    for m in out {
        if m.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match merged.last_mut() {
                Some(prev) if last_was_tool => {
                    prev.content.push('\n');
                    prev.content.push_str(&block);
                }
                _ => merged.push(Message::new("user", block)),
            }
            last_was_tool = true;
            continue;
        }
        last_was_tool = false;
        if let Some(calls) = &m.tool_calls {
            let mut text = m.content.clone();
            for c in calls {
                let f = &c["function"];
                let args = f["arguments"]
                    .as_str()
                    .map_or_else(|| dumps(&f["arguments"]), str::to_owned);
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&call_text(f["name"].as_str().unwrap_or_default(), &args));
            }
            merged.push(Message::new(m.role, text));
        } else {
            merged.push(Message::new(m.role, m.content));
        }
    }
    merged
}

/// A change to one choice's answer, from the text as it comes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    Content(String),
    /// A call starts: its index among the answer's calls, id and function name.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// More of a call's `function.arguments`.
    Arguments {
        index: usize,
        text: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// `"auto"`: the first character decides between text and calls.
    Undecided,
    Content,
    /// Matching a fixed text, then going to the next phase.
    Fixed(&'static str, usize),
    Name,
    Arguments {
        depth: usize,
        string: bool,
        escape: bool,
    },
    /// After a call: a newline starts the next one.
    Between,
}

/// Turns one choice's generated text into content and tool calls, as it comes.
pub struct CallStream {
    phase: Phase,
    name: String,
    calls: usize,
}

impl CallStream {
    /// A stream for an answer that may contain calls (`calls_only`: `"required"` or a named
    /// function, where the answer is all calls).
    pub fn new(calls_only: bool) -> Self {
        Self {
            phase: if calls_only {
                Phase::Fixed(OPEN, 0)
            } else {
                Phase::Undecided
            },
            name: String::new(),
            calls: 0,
        }
    }

    /// How many calls started so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The deltas `text` adds.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        let add = |out: &mut Vec<Delta>, d: Delta| match (out.last_mut(), d) {
            (Some(Delta::Content(a)), Delta::Content(b)) => a.push_str(&b),
            (
                Some(Delta::Arguments { index: i, text: a }),
                Delta::Arguments { index: j, text: b },
            ) if *i == j => a.push_str(&b),
            (_, d) => out.push(d),
        };
        for c in text.chars() {
            match self.phase {
                Phase::Undecided if c == '<' => self.phase = Phase::Fixed(OPEN, 1),
                Phase::Undecided | Phase::Content => {
                    self.phase = Phase::Content;
                    add(&mut out, Delta::Content(c.to_string()));
                }
                Phase::Fixed(s, at) => {
                    if s[at..].starts_with(c) {
                        let at = at + c.len_utf8();
                        self.phase = match (s, at == s.len()) {
                            (_, false) => Phase::Fixed(s, at),
                            (OPEN, true) => Phase::Name,
                            (MID, true) => Phase::Arguments {
                                depth: 0,
                                string: false,
                                escape: false,
                            },
                            _ => Phase::Between,
                        };
                    } else {
                        // Not the grammar's layout (cut by a stop string?): keep it as text.
                        self.phase = Phase::Content;
                        add(&mut out, Delta::Content(format!("{}{c}", &s[..at])));
                    }
                }
                Phase::Name if c == '"' => {
                    let index = self.calls;
                    self.calls += 1;
                    add(
                        &mut out,
                        Delta::Start {
                            index,
                            id: format!(
                                "call_{:016x}{:08x}",
                                super::random_u64(),
                                super::random_u64() as u32
                            ),
                            name: std::mem::take(&mut self.name),
                        },
                    );
                    self.phase = Phase::Fixed(MID, 0);
                }
                Phase::Name => self.name.push(c),
                Phase::Arguments {
                    depth,
                    string,
                    escape,
                } => {
                    let index = self.calls - 1;
                    add(
                        &mut out,
                        Delta::Arguments {
                            index,
                            text: c.to_string(),
                        },
                    );
                    self.phase = match (string, escape, c) {
                        (true, true, _) => Phase::Arguments {
                            depth,
                            string,
                            escape: false,
                        },
                        (true, false, '\\') => Phase::Arguments {
                            depth,
                            string,
                            escape: true,
                        },
                        (true, false, '"') => Phase::Arguments {
                            depth,
                            string: false,
                            escape,
                        },
                        (true, false, _) => Phase::Arguments {
                            depth,
                            string,
                            escape,
                        },
                        (false, _, '"') => Phase::Arguments {
                            depth,
                            string: true,
                            escape,
                        },
                        (false, _, '{' | '[') => Phase::Arguments {
                            depth: depth + 1,
                            string,
                            escape,
                        },
                        (false, _, '}' | ']') if depth <= 1 => Phase::Fixed(CLOSE, 0),
                        (false, _, '}' | ']') => Phase::Arguments {
                            depth: depth - 1,
                            string,
                            escape,
                        },
                        _ => Phase::Arguments {
                            depth,
                            string,
                            escape,
                        },
                    };
                }
                Phase::Between if c == '\n' => self.phase = Phase::Fixed(OPEN, 0),
                Phase::Between => {
                    self.phase = Phase::Content;
                    add(&mut out, Delta::Content(c.to_string()));
                }
            }
        }
        out
    }
}

/// The whole answer: its text content (`None` when it is only calls) and its calls as
/// OpenAI's `tool_calls` entries.
pub fn parse_answer(text: &str, calls_only: bool) -> (Option<String>, Vec<Value>) {
    let mut s = CallStream::new(calls_only);
    let mut content: Option<String> = None;
    let mut calls: Vec<Value> = Vec::new();
    for d in s.push(text) {
        match d {
            Delta::Content(t) => content.get_or_insert_with(String::new).push_str(&t),
            Delta::Start { id, name, .. } => calls.push(json!({
                "id": id, "type": "function", "function": {"name": name, "arguments": ""},
            })),
            Delta::Arguments { index, text } => {
                if let Some(a) = calls.get_mut(index).and_then(|c| {
                    c["function"]["arguments"]
                        .as_str()
                        .map(|a| format!("{a}{text}"))
                }) {
                    calls[index]["function"]["arguments"] = Value::from(a);
                }
            }
        }
    }
    if calls.is_empty() && content.is_none() {
        content = Some(String::new());
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}])
    }

    fn param(tools: Value, choice: Value, parallel: Value) -> String {
        let e = parse(Some(&tools), Some(&choice), Some(&parallel)).unwrap_err();
        e.body()["error"]["param"].as_str().unwrap().to_owned()
    }

    #[test]
    fn bad_tools_and_choices_name_their_parameter() {
        let t = weather();
        assert_eq!(
            param(t.clone(), json!("sometimes"), json!(null)),
            "tool_choice"
        );
        assert_eq!(
            param(
                t.clone(),
                json!({"type": "function", "function": {"name": "nope"}}),
                json!(null)
            ),
            "tool_choice"
        );
        assert_eq!(
            param(t.clone(), json!(null), json!("yes")),
            "parallel_tool_calls"
        );
        assert_eq!(
            param(json!([{"type": "retrieval"}]), json!(null), json!(null)),
            "tools[0].type"
        );
        assert_eq!(
            param(
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!(null),
                json!(null)
            ),
            "tools[0].function.name"
        );
        assert_eq!(
            param(
                json!([{"type": "function", "function": {"name": "a", "parameters": 1}}]),
                json!(null),
                json!(null)
            ),
            "tools[0].function.parameters"
        );
        let twice = json!([t[0].clone(), t[0].clone()]);
        assert_eq!(
            param(twice, json!(null), json!(null)),
            "tools[1].function.name"
        );
        assert_eq!(
            param(json!([]), json!("required"), json!(null)),
            "tool_choice"
        );
        assert!(parse(Some(&json!([])), Some(&json!("none")), None)
            .unwrap()
            .is_none());
        let ok = parse(Some(&t), None, None).unwrap().unwrap();
        assert_eq!(ok.choice, Choice::Auto);
        assert!(ok.parallel);
    }

    /// Whether `g` accepts `text` whole, over a one-byte-per-token alphabet.
    fn accepts(g: GrammarRequest, text: &str) -> bool {
        use llguidance::toktrie::{ApproximateTokEnv, TokEnv};
        let env: TokEnv = std::sync::Arc::new(ApproximateTokEnv::single_byte());
        let f = llguidance::ParserFactory::new_simple(&env).unwrap();
        let mut m = llguidance::Matcher::new(f.create_parser(g.grammar));
        text.bytes().all(|b| {
            m.compute_mask()
                .is_ok_and(|mask| mask.is_allowed(u32::from(b)))
                && m.consume_token(u32::from(b)).is_ok()
        }) && m.is_accepting().unwrap()
    }

    #[test]
    fn grammars_hold_answers_to_the_call_format_and_the_schema() {
        let t = |choice: Value, parallel: bool| {
            parse(
                Some(&weather()),
                Some(&choice),
                Some(&Value::Bool(parallel)),
            )
            .unwrap()
            .unwrap()
            .grammar()
        };
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let two = format!("{call}\n{call}");
        assert!(accepts(t(json!("required"), true), call));
        assert!(accepts(t(json!("required"), true), &two));
        assert!(!accepts(t(json!("required"), false), &two));
        assert!(!accepts(t(json!("required"), true), "Sunny."));
        // The arguments follow the schema: `city` is required.
        assert!(!accepts(
            t(json!("required"), true),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(accepts(t(json!("auto"), true), "Sunny."));
        assert!(accepts(t(json!("auto"), true), call));
        assert!(accepts(t(json!("none"), true), "Sunny."));
        assert!(!accepts(t(json!("none"), true), call));
    }

    #[test]
    fn calls_stream_name_first_then_arguments() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}\\\"ris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        // Any cut of the text gives the same answer.
        for cut in [1, 7, 20, 40, 60, text.len() - 1] {
            let mut s = CallStream::new(false);
            let mut deltas = s.push(&text[..cut]);
            deltas.extend(s.push(&text[cut..]));
            assert_eq!(s.calls(), 2);
            let names: Vec<&str> = deltas
                .iter()
                .filter_map(|d| match d {
                    Delta::Start { name, .. } => Some(name.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(names, ["get_weather", "f"]);
            let args: String = deltas
                .iter()
                .filter_map(|d| match d {
                    Delta::Arguments { index: 0, text } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(args, "{\"city\": \"Pa}\\\"ris\"}");
            assert!(
                !deltas.iter().any(|d| matches!(d, Delta::Content(_))),
                "{deltas:?}"
            );
        }
        let (content, calls) = parse_answer(text, true);
        assert_eq!(content, None);
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        let (content, calls) = parse_answer("Paris is sunny.", false);
        assert_eq!(content.as_deref(), Some("Paris is sunny."));
        assert!(calls.is_empty());
    }

    #[test]
    fn plain_messages_write_calls_and_results_as_text() {
        let tools = parse(Some(&weather()), None, None).unwrap().unwrap();
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![
            json!({"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}),
        ]);
        let msgs = vec![
            Message::new("user", "Weather in Paris?"),
            call,
            Message::new("tool", "{\"temp\": 21}"),
        ];
        let out = plain_messages(msgs, &tools.in_prompt());
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.starts_with("# Tools"));
        assert!(out[0].content.contains("\"name\": \"get_weather\""));
        assert_eq!(out[2].content, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>");
        assert_eq!(out[3].role, "user");
        assert_eq!(
            out[3].content,
            "<tool_response>\n{\"temp\": 21}\n</tool_response>"
        );
    }
}

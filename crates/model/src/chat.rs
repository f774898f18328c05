//! Chat templates: the model's own Jinja template (from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja plus Python-compatible string methods, the
//! way `transformers.apply_chat_template` and llama.cpp's `--jinja` mode render it.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as templates with tool support read them
    /// (`{"id", "type": "function", "function": {"name", "arguments": {...}}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn's call id and function name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Why a template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template")]
    Missing,
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// A compiled chat template with the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template renders `tools` (it mentions them, as llama.cpp checks).
    tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // Templates that print a date call this; a fixed date keeps rendering deterministic.
        env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            tools: source.contains("tools"),
        })
    }

    /// Whether the template renders tool definitions, tool calls and tool results itself.
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the tools the model may call (OpenAI's `tools` entries),
    /// passed to the template as `tools` when there are any.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        // Absent tools stay undefined, as `apply_chat_template` leaves them.
        let tools = if tools.is_empty() {
            minijinja::Value::UNDEFINED
        } else {
            minijinja::Value::from(minijinja::value::Serde(tools))
        };
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ChatTemplateError::Render(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let s = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", " a ")], false).unwrap(),
            "A"
        );
        let err = t.render(&[Message::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tools_reach_templates_that_render_them() {
        assert!(!ChatTemplate::new(CHATML, "", "").unwrap().supports_tools());
        let src = "{% if tools is defined %}{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}{% for m in messages %}{{ m.role }}{% if m.tool_calls is defined %}:{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% if m.tool_call_id is defined %}:{{ m.tool_call_id }}{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert!(t.supports_tools());
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![serde_json::json!(
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}
        )]);
        let mut result = Message::new("tool", "21");
        result.tool_call_id = Some("c1".into());
        let msgs = [Message::new("user", "hi"), call, result];
        let tools = [serde_json::json!({"type": "function", "function": {"name": "w"}})];
        assert_eq!(
            t.render_with_tools(&msgs, &tools, false).unwrap(),
            "w;user|assistant:Paris|tool:c1|"
        );
        // Without tools, `tools` is undefined.
        assert_eq!(t.render(&msgs[..1], false).unwrap(), "user|");
    }

    #[test]
    fn bad_template_is_an_error() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}

//! The model's chat template (`tokenizer.chat_template`, a Jinja template),
//! rendered with minijinja the way Hugging Face renders it.

use minijinja::{Environment, Error, ErrorKind, context};

use super::{ChatTurn, TextError};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos: String, eos: String) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source).map_err(|e| TextError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Renders the turns followed by the assistant's generation prompt.
    pub fn render(&self, turns: &[ChatTurn]) -> Result<String, TextError> {
        let tmpl = self.env.get_template("chat").map_err(|e| TextError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => turns,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| TextError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders_roles_and_generation_prompt() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                   {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        let out = t.render(&[ChatTurn { role: "user".into(), content: "Hi".into() }]).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}".into(), "".into(), "".into()).unwrap();
        let err = t.render(&[]).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}

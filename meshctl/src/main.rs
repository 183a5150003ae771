//! `meshctl`: talk to a node (or, later, a sidecar) from the shell.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, ListModelsRequest, SamplingParams,
    generate_request::Input,
};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Operator CLI for the model-serving mesh.")]
struct Cli {
    /// gRPC address of a node or sidecar.
    #[arg(long, env = "MESH_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a completion to stdout (a chat turn by default, or --raw prompt).
    Generate {
        /// What to ask.
        text: String,
        /// Send the text as a raw prompt instead of a chat message.
        #[arg(long)]
        raw: bool,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// List the models a server serves, with their limits.
    Models,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut client =
        GenerationClient::connect(cli.addr.clone()).await.with_context(|| format!("connecting to {}", cli.addr))?;
    match cli.command {
        Command::Models => {
            for m in client.list_models(ListModelsRequest {}).await?.into_inner().models {
                println!(
                    "{}\tbackend={} context={} max_running={} max_queued={} max_kv_tokens={}",
                    m.name, m.backend, m.context_length, m.max_running, m.max_queued, m.max_kv_tokens
                );
            }
        }
        Command::Generate { text, raw, model, max_tokens, temperature, seed } => {
            let input = match raw {
                true => Input::Prompt(text),
                false => {
                    Input::Chat(ChatMessages { messages: vec![ChatMessage { role: "user".into(), content: text }] })
                }
            };
            let req = GenerateRequest {
                model: model.unwrap_or_default(),
                input: Some(input),
                sampling: Some(SamplingParams { max_tokens, temperature, seed, ..Default::default() }),
                ..Default::default()
            };
            let started = Instant::now();
            let mut stream = client.generate(req).await?.into_inner();
            let mut stdout = std::io::stdout();
            while let Some(msg) = stream.message().await? {
                write!(stdout, "{}", msg.text)?;
                stdout.flush()?;
                if let Some(u) = msg.usage {
                    let reason = FinishReason::try_from(msg.finish_reason).map_or("?", |r| r.as_str_name());
                    eprintln!(
                        "\n[{reason}] prompt {} tokens, completion {} tokens, ttft {:.1} ms, total {:.1} ms",
                        u.prompt_tokens,
                        u.completion_tokens,
                        u.time_to_first_token_us as f64 / 1e3,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
            }
        }
    }
    Ok(())
}

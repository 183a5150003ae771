//! The tokenizer built from the GGUF metadata against an independent
//! implementation: llama.cpp.
//!
//! Expected ids were produced with llama-cpp-python 0.3.x (built from PyPI):
//! `Llama(model_path=SmolLM2-135M-Instruct.Q4_1.gguf, vocab_only=True)
//!  .tokenize(text.encode(), add_bos=False, special=True)`.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use node::text::{ChatTurn, GgufText, TextCodec};

fn codec() -> GgufText {
    let path = std::env::var_os("MESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let mut file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-model.sh", path.display()));
    let content = gguf_file::Content::read(&mut file).unwrap();
    GgufText::from_metadata(&content.metadata).unwrap()
}

const CASES: &[(&str, &[u32])] = &[
    ("Hello, world!", &[19556, 28, 905, 17]),
    (
        "The year 2024 had 366 days and 12345 seconds.",
        &[504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 284, 216, 33, 34, 35, 36, 37, 7345, 30],
    ),
    ("tabs\tand   three spaces\n\nnew lines", &[100, 7366, 197, 397, 256, 1296, 5600, 198, 198, 2241, 3204]),
    (
        "東京は日本の首都です。",
        &[
            30679, 126, 16736, 122, 7365, 124, 23274, 115, 40993, 26453, 180, 116, 240, 180, 38466, 7365, 117, 39958,
            19076,
        ],
    ),
    ("emoji 😀👍🏽 done", &[391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 2294]),
    ("<|im_start|>user\nHi<|im_end|>\n", &[1, 4093, 198, 26843, 2, 198]),
    ("  leading spaces and trailing  ", &[216, 2899, 5600, 284, 35079, 256]),
    ("don't won't it's I'm", &[12420, 982, 3763, 982, 357, 506, 339, 5248]),
];

#[test]
fn token_ids_match_llama_cpp() {
    let codec = codec();
    for (text, expected) in CASES {
        assert_eq!(codec.encode(text).unwrap(), *expected, "ids of {text:?}");
    }
}

#[test]
fn decoding_round_trips_the_text() {
    let codec = codec();
    for (text, expected) in CASES.iter().filter(|(t, _)| !t.contains("<|")) {
        assert_eq!(codec.decode(expected).unwrap(), *text);
    }
}

#[test]
fn chat_template_from_the_file_renders_chatml_with_default_system_prompt() {
    let out = codec().render_chat(&[ChatTurn { role: "user".into(), content: "Hi".into() }]).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn end_of_sequence_is_im_end() {
    assert_eq!(codec().eos_ids(), &[2]);
}
